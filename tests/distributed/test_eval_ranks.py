"""The streamed evaluation over two gloo ranks (hardware=cpu_x2) against one process, through the real CLI: the
same scores, both ranks scoring batches, and a rank's failure failing the job promptly, naming the rank."""

import json
import re
import time

import pytest

from slim.eval_ranks import assign
from tests.helpers.cli import sitecustomize_env, slim_main

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
EVAL = ["eval.backend=streamed", "eval.limit=6", "eval.batch_size=2", "logger=none"]


def test_assign_balances_by_cost_and_is_deterministic():
    costs = [5, 9, 1, 7, 3, 3]
    owners = assign(costs, 2)
    assert owners == assign(costs, 2)
    load = [sum(c for c, r in zip(costs, owners) if r == k) for k in range(2)]
    assert owners == [1, 0, 1, 1, 0, 0] and load == [15, 13]  # 9 7 5 3 3 1 to the least-loaded rank in turn
    assert max(load) - min(load) <= max(costs)
    assert assign(costs, 1) == [0] * len(costs)
    assert set(assign([1, 1, 1], 5)) == {0, 1, 2}  # more ranks than jobs: some score nothing


@pytest.mark.slow
def test_two_ranks_score_what_one_process_scores(tmp_path):
    results, logs = {}, {}
    for hw in ("cpu", "cpu_x2"):
        run_dir = tmp_path / hw
        proc = slim_main(f"hardware={hw}", "scheme=w4a8", "calibration.num_samples=8", "calibration.seq_len=128",
                         *EVAL, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[hw] = json.loads((run_dir / "results.json").read_text())
        logs[hw] = "".join(p.read_text() for p in sorted(run_dir.glob("*.log")))  # every rank's log file
    one, two = results["cpu"], results["cpu_x2"]
    assert set(one["metrics"]) == {"baseline", "quantized"}
    assert one["metrics"] == two["metrics"]  # a batch is scored whole by one rank: bit-identical sums
    assert two["eval"]["ranks"] == 2 and "ranks" not in one["eval"]
    # rank 1 scored batches of both tasks (the baseline's scores come from the cache the first run filled)
    scored = re.findall(r"streamed eval \(rank 1/2\): (\d+) batches", logs["cpu_x2"])
    assert len(scored) >= 2 and all(int(n) >= 1 for n in scored), logs["cpu_x2"][-3000:]


@pytest.mark.slow
def test_a_rank_failing_while_scoring_fails_the_job_naming_it(tmp_path):
    env = {**ONE_THREAD, **sitecustomize_env(tmp_path,
                                             "import os\n"
                                             "if os.environ.get('RANK') == '1':\n"
                                             "    import slim.evaluate_streamed as e\n"
                                             "    def broken(self, jobs):\n"
                                             "        raise RuntimeError('injected scoring fault')\n"
                                             "    e.LayerScorer.score_jobs = broken\n")}
    start = time.monotonic()
    proc = slim_main("hardware=cpu_x2", "mode=eval", *EVAL, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                     env=env, timeout=280)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "streamed evaluation failed on rank 1: RuntimeError: injected scoring fault" in proc.stderr, \
        proc.stderr[-3000:]
    assert elapsed < 200, elapsed  # not the 300 s collective timeout of hardware=cpu_x2
