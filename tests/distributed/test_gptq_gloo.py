"""algorithm=gptq on two gloo ranks (hardware=cpu_x2) against one process (hardware=cpu), through the real CLI.

Each rank sums x^T x over its own calibration samples (every second one) in fp32; the ranks' sums are then added
in rank order (``Dist.sum_in_rank_order``): the same H on every rank, run after run. One process adds the same
products in another order (its batches hold other samples), so its H differs from the ranks' in the last bits of
fp32, and GPTQ, whose every column's rounding feeds the next, may round a weight sitting at a rounding boundary the
other way: a small fraction of codes differs, bounded here. Everything else (input scales, the tensors written
unquantized) is bit-identical, and two 2-rank runs are bit-identical to each other. With
``algorithm.hessian_dtype=float64`` the sums agree to far more bits than the fp32 H keeps, so far fewer codes can
differ (a sum that lands on an fp32 rounding boundary still can: it was seen once, in one expert).
"""

import pytest
import torch

from tests.distributed.test_gloo import COMMON, slim_main, tensors

MAX_DIFFERING_CODES = 2e-3  # fraction of int4 codes of the GPTQ'd Linears (measured value: docs/algorithms.md)
MAX_DIFFERING_CODES_FP64 = 2e-4  # with float64 Hessians: mostly none, at most a column's worth of one expert


def int4_codes(words: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' pack-quantized int32 words [out, in // 8] -> the 8 nibbles of each word."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (words.unsqueeze(-1) >> shifts) & 0xF


@pytest.mark.slow
def test_float64_hessians_give_one_process_codes_on_two_ranks(tmp_path):
    """Summed in float64, x^T x agrees across summation orders far below what rounding H to fp32 keeps."""
    runs = {}
    for hw in ("cpu", "cpu_x2"):
        proc = slim_main(f"hardware={hw}", "scheme=w4a8", "algorithm=gptq", "algorithm.hessian_dtype=float64",
                         *COMMON, f"hydra.run.dir={tmp_path / hw}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[hw] = tensors(tmp_path / hw / "checkpoint")
    one, two = runs["cpu"], runs["cpu_x2"]
    assert one.keys() == two.keys()
    assert differing_fraction(one, two) <= MAX_DIFFERING_CODES_FP64


def differing_fraction(one: dict, two: dict) -> float:
    """The fraction of int4 codes that differ between two checkpoints' packed weights; every other tensor (input
    scales, unquantized tensors) must be bit-identical."""
    differing = total = 0
    for name in one:
        if name.endswith(".weight_packed"):
            a, b = int4_codes(one[name]), int4_codes(two[name])
            differing += int((a != b).sum())
            total += a.numel()
        elif not name.endswith(".weight_scale"):
            assert torch.equal(one[name], two[name]), name
    print(f"codes differing between 1 process and 2 ranks: {differing} of {total} ({differing / total:.2e})")
    return differing / total


@pytest.mark.slow
def test_two_ranks_gptq_deterministic_and_close_to_one_process(tmp_path):
    runs = {}
    for name, hw in (("one", "cpu"), ("two", "cpu_x2"), ("two_again", "cpu_x2")):
        proc = slim_main(f"hardware={hw}", "scheme=w4a8", "algorithm=gptq", *COMMON, f"hydra.run.dir={tmp_path / name}",
                         cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = tensors(tmp_path / name / "checkpoint")
    one, two, again = runs["one"], runs["two"], runs["two_again"]
    assert one.keys() == two.keys() == again.keys()
    for name in two:
        assert torch.equal(two[name], again[name]), name  # run to run: the same bits
    packed = [n for n in one if n.endswith(".weight_packed")]
    assert len(packed) == 3 * 16 * 3  # the routed experts of the 3 MoE layers
    assert differing_fraction(one, two) <= MAX_DIFFERING_CODES
