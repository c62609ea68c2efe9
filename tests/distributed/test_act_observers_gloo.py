"""The mse and percentile activation observers merge exactly: two gloo ranks (hardware=cpu_x2) write the same
checkpoint as one process, through the real CLI; and their input scales are not minmax's."""

import pytest
import torch

from tests.distributed.test_gloo import COMMON, slim_main, tensors


@pytest.mark.slow
def test_searched_input_scales_two_ranks_bit_identical_to_one(tmp_path):
    ckpts = {}
    for observer, hw in (("minmax", "cpu"), ("mse", "cpu"), ("mse", "cpu_x2"), ("percentile", "cpu"),
                         ("percentile", "cpu_x2")):
        run_dir = tmp_path / f"{observer}_{hw}"
        proc = slim_main(f"hardware={hw}", "scheme=fp8_static", f"scheme.activation_observer={observer}", *COMMON,
                         f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        ckpts[observer, hw] = tensors(run_dir / "checkpoint")
    minmax = ckpts["minmax", "cpu"]
    for observer in ("mse", "percentile"):
        one, two = ckpts[observer, "cpu"], ckpts[observer, "cpu_x2"]
        assert one.keys() == two.keys() == minmax.keys()
        for name in one:
            assert one[name].dtype == two[name].dtype and torch.equal(one[name], two[name]), (observer, name)
        scales = [n for n in one if n.endswith("input_scale")]
        assert scales
        # the clip is at most the absmax, and on this model's heavy-tailed inputs some clip lower
        assert all((one[n] <= minmax[n]).all() for n in scales), observer
        assert any((one[n] < minmax[n]).any() for n in scales), observer
