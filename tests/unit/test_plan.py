"""mode=plan: memory per rank from config.json alone, for the DeepSeek-R1 presets and an impossible one."""

import pytest
import torch

from slim import kernels
from slim.config import ASSETS
from slim.errors import SlimError
from slim.formats import FORMATS
from slim.models.adapters import build_skeleton, load_config
from slim.plan_mode import plan_stage
from slim.plan import GiB, plan_memory
from slim.quant.schemes import SCHEMES
from slim.quantize import STREAM_AHEAD, STREAM_AHEAD_BYTES, streamed_int4
from slim.targets import select_targets
from tests.helpers.configs import compose_config

R1 = ASSETS / "configs" / "deepseek_r1"


@pytest.fixture(scope="module")
def r1_skeleton():
    return build_skeleton(load_config(str(R1)), torch.bfloat16)  # meta device: no memory


def r1_cfg(*overrides):
    return compose_config("model=deepseek_r1", f"model.path={R1}", "calibration=jsonl", "calibration.path=x", *overrides)


@pytest.mark.parametrize("hardware", ["h20x1_lowmem", "h20x8", "h20x16"])
@pytest.mark.parametrize("scheme", ["fp8_static", "w4a8"])
def test_deepseek_r1_presets_are_feasible(r1_skeleton, hardware, scheme):
    model, adapter = r1_skeleton
    cfg = r1_cfg(f"hardware={hardware}", f"scheme={scheme}")
    plan = plan_memory(cfg, model, adapter, select_targets(model, cfg.scheme.ignore_layers).ignored)
    assert plan.feasible, plan.table()
    assert 670e9 < plan.parameters < 672e9  # 671B without the MTP layer
    assert plan.largest_layer_params == 11_507_286_016  # one MoE layer: 256 routed experts + shared + MLA
    # the layer streamed onto the device, in bf16
    assert plan.device_bytes["layer weights (compute dtype)"] == plan.largest_layer_params * 2
    expected_ckpt = {"fp8_static": (600, 650), "w4a8": (320, 370)}[scheme]
    assert expected_ckpt[0] < plan.checkpoint_bytes / GiB < expected_ckpt[1]


def test_host_holds_one_mapped_layer_and_one_tensor_in_flight(r1_skeleton):
    model, adapter = r1_skeleton
    for load_type, stored in (("fp8", 1), ("bf16", 2)):
        cfg = r1_cfg("hardware=h20x8", "scheme=fp8_static", f"model.load_type={load_type}")
        host = plan_memory(cfg, model, adapter, {"lm_head"}).host_bytes
        assert host["checkpoint pages of one layer (memory-mapped)"] == 11_507_286_016 * stored
        # the largest quantized Linear: a dense-layer MLP projection, 18432 x 7168 FP8 codes + two scales
        assert host["writer (quantized tensors in flight)"] == 18432 * 7168 + 8
        assert host["writer queue (tensors waiting for the disk)"] == 256 << 20  # an eighth of 21 GiB, capped
    cfg = r1_cfg("hardware=h20x8", "calibration=none", "scheme=w4a8_dynamic")
    plan = plan_memory(cfg, model, adapter, {"lm_head"})
    assert plan.device_bytes["calibration hidden states (in + out)"] == 0 and plan.feasible


@pytest.mark.skipif(kernels.library() is None, reason="the streamed path needs the CPU kernels (a C compiler)")
def test_streamed_cpu_runs_have_no_writer_queue_but_linears_in_flight(r1_skeleton):
    """Calibration off on a CPU: the main thread writes while the kernels quantize Linears ahead (STREAM_AHEAD of
    R1's largest; up to STREAM_AHEAD_BYTES of small ones), with up to STREAM_AHEAD_BYTES of spare outputs kept for
    reuse; each holds its packed words and group scales (the kernel packs in its pass and stores no int8 codes)."""
    model, adapter = r1_skeleton
    cfg = r1_cfg("hardware=cpu", "calibration=none", "scheme=w4a8_dynamic")
    plan = plan_memory(cfg, model, adapter, {"lm_head"})
    n = 18432 * 7168  # the largest quantized Linear
    one = n // 2 + n // 128 * 2 + 16  # packed int4, bf16 group scales, shape and input scale
    assert plan.host_bytes["writer (quantized tensors in flight)"] == (STREAM_AHEAD + 1) * one + STREAM_AHEAD_BYTES
    assert plan.host_bytes["writer queue (tensors waiting for the disk)"] == plan.write_queue_bytes == 0
    assert plan.host_bytes["writer staging buffers (direct I/O)"] == 4 << 20  # four 1 MiB buffers
    # nothing runs a layer: its block-FP8 Linear weights stay mapped, only norms and the router are materialized
    assert plan.host_bytes["layer weights (compute dtype)"] == 1_851_392 * 2
    assert plan.feasible, plan.table()  # 10.7 GiB of mapped FP8 codes + 2 GiB runtime fit the 24 GiB preset
    off = ("hardware=cpu", "calibration=none", "scheme=w4a8_dynamic")
    # calibrated; the torch path; from bf16: the layer is materialized, a writer thread writes
    for other in (r1_cfg("hardware=cpu"), r1_cfg(*off, "hardware.cpu_kernels=false"),
                  r1_cfg(*off, "model.load_type=bf16")):
        whole = plan_memory(other, model, adapter, {"lm_head"})
        assert whole.write_queue_bytes == 256 << 20
        assert whole.host_bytes["layer weights (compute dtype)"] == 11_507_286_016 * 2 and not whole.feasible


def test_hidden_states_too_big_for_the_device_wait_in_host_memory(r1_skeleton):
    model, adapter = r1_skeleton
    small = plan_memory(r1_cfg("hardware=h20x1_lowmem"), model, adapter, {"lm_head"})
    assert small.hidden_states_on == "device" and "calibration hidden states (in + out)" in small.device_bytes
    cfg = r1_cfg("hardware=h20x1_lowmem", "calibration.num_samples=1024", "calibration.seq_len=4096",
                 "calibration.batch_size=1")
    big = plan_memory(cfg, model, adapter, {"lm_head"})
    every = 2 * 1024 * 4096 * 7168 * 2  # every sample's layer input and output, bf16: 112 GiB > 96 GiB
    assert big.hidden_states_on == "host" and big.feasible, big.table()
    assert big.host_bytes["calibration hidden states (in + out)"] == every
    assert big.device_bytes["calibration hidden states (one batch in + out)"] == every // 1024
    assert "kept on the host" in big.table()
    strict = plan_memory(r1_cfg("hardware=h20x1_lowmem", "calibration.num_samples=1024", "calibration.seq_len=4096",
                                "calibration.batch_size=1", "scheme.low_memory=false"), model, adapter, {"lm_head"})
    assert strict.hidden_states_on == "device" and not strict.feasible  # low_memory=false: no offload, refused
    cpu = plan_memory(r1_cfg("hardware=cpu"), model, adapter, {"lm_head"})
    assert cpu.hidden_states_on == "host" and not cpu.device_bytes


def test_hidden_states_shrink_with_ranks(r1_skeleton):
    model, adapter = r1_skeleton
    per = {}
    for hw in ("h20x1_lowmem", "h20x16"):
        cfg = r1_cfg(f"hardware={hw}")
        per[hw] = plan_memory(cfg, model, adapter, {"lm_head"}).device_bytes["calibration hidden states (in + out)"]
    assert per["h20x1_lowmem"] == 16 * per["h20x16"]


def test_too_small_device_is_refused_with_the_fix(tmp_path):
    cfg = r1_cfg("hardware=h20x1_lowmem", "hardware.device_memory_gb=24", f"run_dir={tmp_path}")
    with pytest.raises(SlimError, match="needs .* GiB per device.*lower calibration"):
        plan_stage(cfg)
    assert (tmp_path / "results.json").is_file()  # the breakdown is still written


@pytest.mark.skipif(kernels.library() is None, reason="the streamed path needs the CPU kernels (a C compiler)")
def test_streamed_linears_in_flight_follow_what_the_kernel_stores(r1_skeleton):
    """What the streamed path holds per Linear (``streamed_int4``): groups that are not whole int32 words keep
    the kernel's int8 codes beside the words packed after it; a weight observer other than minmax materializes
    each weight in bf16, one Linear at a time."""
    model, adapter = r1_skeleton
    n = 18432 * 7168  # the largest quantized Linear
    off = ("hardware=cpu", "calibration=none", "scheme=w4a8_dynamic")
    codes = plan_memory(r1_cfg(*off, "scheme.group_size=4"), model, adapter, {"lm_head"})
    assert codes.host_bytes["writer (quantized tensors in flight)"] == (STREAM_AHEAD + 1) * (
        n + n // 2 + n // 4 * 2 + 16) + STREAM_AHEAD_BYTES
    mse = plan_memory(r1_cfg(*off, "scheme.weight_observer=mse"), model, adapter, {"lm_head"})
    assert mse.host_bytes["writer (quantized tensors in flight)"] == n * 2 + n + n // 2 + n // 128 * 2 + 16


def test_streamed_int4_says_where_the_kernel_quantizes_and_packs():
    ct, w4, fp8 = FORMATS["compressed-tensors"], SCHEMES["w4a8_dynamic"], SCHEMES["fp8_static"]
    assert streamed_int4(w4, ct, 128, "minmax") == (True, True)
    assert streamed_int4(w4, ct, 4, "minmax") == (True, False)  # groups of half a word: packed after the kernel
    assert streamed_int4(w4, ct, 128, "mse") == (False, False)
    assert streamed_int4(fp8, ct, None, "minmax") == (False, False)
