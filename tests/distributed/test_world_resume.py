"""An export killed (SIGKILL) after a commit point resumes on another number of gloo ranks, through the real CLI,
and finishes byte-identical to an uninterrupted run on the world size that started it (``slim.layout``)."""

import json
import signal

import pytest

from tests.cli.test_faults import fault_env, files
from tests.helpers.cli import slim_main

QUICK = ["eval=none", "logger=none", "calibration.num_samples=6", "calibration.seq_len=64", "export.max_shard_mb=1"]
HW = {1: "hardware=cpu", 2: "hardware=cpu_x2"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """world size -> every file of an uninterrupted export's checkpoint."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for world in (1, 2):
        proc = slim_main(HW[world], *QUICK, f"hydra.run.dir={tmp / str(world)}", cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[world] = files(tmp / str(world) / "checkpoint")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("started,resumed,killed_rank", [(2, 1, 1), (1, 2, 0)])
def test_killed_export_resumes_on_another_world_size_byte_identical(tmp_path, uninterrupted, started, resumed,
                                                                     killed_rank):
    run = tmp_path / "run"
    # the third commit point's save: layers 0 and 1 are committed, layer 2 is written but not committed
    killed = slim_main(HW[started], *QUICK, f"hydra.run.dir={run}", cwd=tmp_path,
                       env=fault_env(tmp_path, "slim.layout:ResumeSet.save_layer:3:kill", killed_rank))
    assert killed.returncode != 0, killed.stderr[-2000:]
    if started == 1:
        assert killed.returncode == -signal.SIGKILL
    commit = json.loads((run / "checkpoint" / ".slim_resume" / "commit.json").read_text())
    assert (commit["layer"], commit["slots"], commit["world"]) == (1, started, started)
    assert not (run / "checkpoint" / "config.json").exists()

    proc = slim_main(HW[resumed], *QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "resuming after layer 1" in log
    got = files(run / "checkpoint")
    want = uninterrupted[started]
    assert got.keys() == want.keys()
    assert [n for n in want if got[n] != want[n]] == []  # every file, byte for byte
    assert f"the export was started on {started} rank(s), resumed on {resumed}" in log
    assert not (run / "checkpoint" / ".slim_resume").exists()
    # the two uninterrupted layouts differ (shards per rank), so the comparison above tells them apart
    assert uninterrupted[1].keys() != uninterrupted[2].keys() or uninterrupted[1] != uninterrupted[2]
