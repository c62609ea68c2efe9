import pytest
import torch

from slim.quant.observers import MinMaxObserver, weight_clip_minmax, weight_clip_mse
from slim.quant.schemes import SCHEMES, _fp8_round_trip, _int4_round_trip, dequantize_weight


def test_minmax_observer_tracks_amax_and_tokens():
    obs = MinMaxObserver()
    obs.update(torch.tensor([[1.0, -3.0], [0.5, 2.0]]))
    obs.update(torch.zeros(0, 2))
    obs.update(torch.tensor([[[-2.5, 0.0]]]))
    assert obs.amax.item() == 3.0 and obs.tokens == 3 and not obs.nonfinite
    obs.update(torch.tensor([[float("nan"), 0.0]]))
    assert obs.nonfinite


@pytest.mark.parametrize("round_trip", [_int4_round_trip, _fp8_round_trip])
def test_mse_clip_never_worse_than_minmax(round_trip):
    torch.manual_seed(0)
    groups = torch.distributions.StudentT(3.0).sample((64, 8, 128))  # heavy tails: clipping pays
    err = lambda clip: (round_trip(groups, clip) - groups).abs().pow(2.4).sum(-1)  # noqa: E731  (its objective)
    mse_clip, mm_clip = weight_clip_mse(groups, round_trip), weight_clip_minmax(groups, round_trip)
    assert (err(mse_clip) <= err(mm_clip)).all()
    assert (mse_clip <= mm_clip).all() and (mse_clip >= 0.8 * mm_clip - 1e-6).all()
    assert (mse_clip < mm_clip).float().mean() > 0.3  # heavy tails: many groups clip


def test_mse_observer_lowers_int4_error_on_heavy_tailed_weights():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02
    errors = {}
    for obs in ("minmax", "mse"):
        q = SCHEMES["w4a8_dynamic"].quantize(w, None, group_size=128, weight_observer=obs)
        errors[obs] = (dequantize_weight(q) - w).pow(2).sum().item()
    assert errors["mse"] < 0.95 * errors["minmax"]


def test_unknown_weight_observer():
    with pytest.raises(ValueError, match="minmax, mse"):
        SCHEMES["fp8_static"].quantize(torch.ones(4, 4), torch.tensor(1.0), weight_observer="percentile")
