"""Observers: statistics gathered from tensors that decide quantization scales. One registry entry each.

Activation observers see calibration inputs batch by batch (``update``); every one keeps the running absmax,
merged across ranks by MAX (order-independent: a distributed run gives the same scales as a single process).
Those that need more carry integer ``counts()`` that ranks sum, or a ``state()`` that ranks exchange (``merge``,
every rank's state in rank order), and
choose their clip once the layer's weights are at hand (``select_clip``, called by :func:`resolve_input_clips`
before the input scales are computed): ``minmax`` the absmax, ``mse`` the clip with the smallest layer-output
error on a bounded, deterministic sample of rows, ``percentile`` a percentile of |x| from a fixed-edge histogram.
docs/observers.md describes them.
Weight observers choose, per tensor or per group, the absolute value the scale is derived from
(``scale = clip / qmax``): ``minmax`` takes the plain absmax, ``mse`` searches a clip that minimises the
quantization error of that group (``sum |err|^2.4``, as llm-compressor's MSE observer).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from slim.quant.fp8 import fake_quantize_fp8, fp8_scale
from slim.quant.stats import absmax


class MinMaxObserver:
    """Running max |x| (fp32), the number of tokens (rows) seen, and the first ``sample_rows`` rows
    (kept to measure the quantized module's output error)."""

    def __init__(self, sample_rows: int = 32) -> None:
        self.amax = torch.zeros((), dtype=torch.float32)
        self.tokens = 0
        self.nonfinite = False
        self.sample_rows = sample_rows
        self.sample: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # x: [..., in_features]
        if x.numel() == 0:
            return
        batch_amax = absmax(x.detach()).float().cpu()
        if not torch.isfinite(batch_amax):
            self.nonfinite = True
        self.amax = torch.maximum(self.amax, batch_amax)
        self.tokens += x.numel() // x.shape[-1]
        have = 0 if self.sample is None else self.sample.shape[0]
        if have < self.sample_rows:
            rows = x.detach().reshape(-1, x.shape[-1])[: self.sample_rows - have].clone()
            self.sample = rows if self.sample is None else torch.cat([self.sample, rows])


    def state(self) -> object | None:
        """What ranks exchange besides amax/tokens/NaN flags (merged by ``Dist.reduce_observers``); None: nothing."""
        return None

    def counts(self) -> torch.Tensor | None:
        """Integer statistics that merge by summing (int64 [K]): ``Dist.reduce_observers`` sums them over ranks
        with one all_reduce, in place. None: nothing."""
        return None

    def merge(self, states: list) -> None:
        """Combine every rank's :meth:`state` (rank order, this rank's included) into this observer."""

    def select_clip(self, weight: torch.Tensor) -> torch.Tensor:
        """The value the static input scale is computed from (``clip / 448``): the observed absmax."""
        return self.amax


# ---- mse: the clip with the smallest layer-output error, estimated on a bounded, deterministic row sample ------
MSE_ROWS = 128  # uniform sample: the rows with the smallest hash
MSE_TOP_ROWS = 32  # plus the rows with the largest |x| (outlier tokens, e.g. attention sinks), counted exactly
MSE_GRID = 8  # candidate clips per octave below the absmax: amax * 2**(-i / MSE_GRID)
MSE_OCTAVES = 3  # ... down to amax / 2**MSE_OCTAVES
_HASH_COEFFS: dict[int, torch.Tensor] = {}


def row_hash(rows: torch.Tensor) -> torch.Tensor:
    """A hash of each row's fp32 bits (rows [R, n] -> [R] int64): ``sum_j bits_j * a_j``, ``bits_j`` the unsigned
    32-bit pattern, ``a`` fixed pseudo-random in [1, 2**16) (seeded by n). Each product is below 2**48, so for
    n < 2**15 the sum never overflows int64; integer sums are exact in any order, so a row hashes the same on
    every rank, in any batch, on any device."""
    n = rows.shape[-1]
    if n not in _HASH_COEFFS:
        gen = torch.Generator().manual_seed(n)
        _HASH_COEFFS[n] = torch.randint(1, 2**16, (n,), generator=gen, dtype=torch.int64)
    bits = rows.float().contiguous().view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)  # [R, n]
    return (bits * _HASH_COEFFS[n].to(rows.device)).sum(-1)


def bottom_k(keys: torch.Tensor, hashes: torch.Tensor, rows: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` rows with the smallest ``(key, hash)``, in that order: the same set whatever order or partition
    the rows arrived in (rows with equal keys and hashes are, but for a hash collision, equal rows)."""
    order = torch.sort(hashes, stable=True).indices
    order = order[torch.sort(keys[order], stable=True).indices][:k]
    return keys[order], hashes[order], rows[order]


class RowSample:
    """``k`` rows chosen by ``(key, hash)`` (key: the hash itself for a uniform sample, -row absmax for the
    outlier rows), on the CPU in the input's dtype; merging is the same choice over the union of the parts."""

    def __init__(self, k: int, by_absmax: bool) -> None:
        self.k, self.by_absmax = k, by_absmax
        self.keys = self.hashes = torch.zeros(0, dtype=torch.int64)
        self.rows: torch.Tensor | None = None

    def _keys(self, rows: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
        return -absmax(rows.float(), dim=-1) if self.by_absmax else hashes

    def add(self, rows: torch.Tensor, hashes: torch.Tensor) -> None:
        keys, hashes, rows = bottom_k(self._keys(rows, hashes), hashes, rows, self.k)  # on the input's device
        self.merge([(keys.cpu(), hashes.cpu(), rows.cpu())])

    def state(self) -> tuple | None:
        return None if self.rows is None else (self.keys, self.hashes, self.rows)

    def merge(self, states: list) -> None:
        parts = [p for p in [self.state()] + states if p is not None]
        if parts:
            self.keys, self.hashes, self.rows = bottom_k(*(torch.cat([p[i] for p in parts]) for i in range(3)),
                                                         self.k)

    def replace(self, states: list) -> None:
        self.keys, self.hashes, self.rows = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), None
        self.merge(states)


class MSEObserver(MinMaxObserver):
    """Absmax plus two deterministic row samples that do not depend on batch order or on how samples are split
    over ranks (merging takes the same choice over every rank's rows): the ``MSE_TOP_ROWS`` rows with the
    largest |x| and a uniform sample, the ``MSE_ROWS`` rows with the smallest :func:`row_hash`.
    :meth:`select_clip` searches the clip ``c <= absmax`` minimising the estimated output error over all
    calibration rows, ``sum_top e_i + (N - T) / |S| * sum_S e_i`` with ``e_i = ||(fq(x_i, c/448) - x_i) W^T||^2``
    (``fq``: the FP8 round trip of :func:`slim.quant.fp8.fake_quantize_fp8`), T the top rows, S the uniform
    sample less the top rows, N the tokens seen. ``c = absmax`` is the first candidate: on this estimate it is
    never worse than minmax. The top rows matter: a uniform sample of a few hundred rows easily misses the few
    outlier tokens (one per sequence), and a clip fitted without them clips them hard."""

    def __init__(self, sample_rows: int = 32, rows: int = MSE_ROWS, top_rows: int = MSE_TOP_ROWS) -> None:
        super().__init__(sample_rows)
        self.uniform, self.top = RowSample(rows, by_absmax=False), RowSample(top_rows, by_absmax=True)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if x.numel() == 0:
            return
        new = x.detach().reshape(-1, x.shape[-1])
        hashes = row_hash(new)
        self.uniform.add(new, hashes)
        self.top.add(new, hashes)

    def state(self) -> object | None:
        return None if self.uniform.rows is None else (self.uniform.state(), self.top.state())

    def merge(self, states: list) -> None:
        states = [s for s in states if s is not None]
        if states:  # every rank's states, this rank's included: rebuild from them
            self.uniform.replace([s[0] for s in states])
            self.top.replace([s[1] for s in states])

    def weighted_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the search sees [R, in] and each one's weight [R] (fp64): 1 for the top rows, (N - T) / |S|
        for the uniform sample's other rows (``tokens`` is N, merged across ranks)."""
        top = set(self.top.hashes.tolist())
        rest = torch.tensor([h not in top for h in self.uniform.hashes.tolist()], dtype=torch.bool)
        others = self.uniform.rows[rest]
        t = self.top.rows.shape[0]
        w_rest = (self.tokens - t) / others.shape[0] if others.shape[0] else 0.0
        weights = torch.cat([torch.ones(t, dtype=torch.float64),
                             torch.full((others.shape[0],), float(w_rest), dtype=torch.float64)])
        return torch.cat([self.top.rows, others]), weights

    def select_clip(self, weight: torch.Tensor) -> torch.Tensor:
        if self.uniform.rows is None or float(self.amax) == 0.0:
            return self.amax
        rows, row_weights = self.weighted_rows()
        return mse_input_clip(rows, weight, self.amax, row_weights)


def input_clip_errors(rows: torch.Tensor, weight: torch.Tensor, clips: list[torch.Tensor],
                      row_weights: torch.Tensor | None = None) -> list[float]:
    """rows [R, in], weight [out, in] -> per clip, ``sum_i w_i ||(fq(x_i, clip/448) - x_i) W^T||^2`` (fp32
    products, fp64 sums; w = 1 when not given)."""
    x = rows.to(device=weight.device, dtype=torch.float32)
    w = weight.float()
    rw = None if row_weights is None else row_weights.to(device=weight.device, dtype=torch.float64)
    out = []
    for clip in clips:
        diff = fake_quantize_fp8(x, fp8_scale(clip.float().reshape(1)).to(x.device)) - x  # [R, in]
        per_row = (diff @ w.t()).double().pow(2).sum(-1)  # [R]
        out.append(float(per_row.sum() if rw is None else (per_row * rw).sum()))
    return out


def mse_input_clip(rows: torch.Tensor, weight: torch.Tensor, amax: torch.Tensor,
                   row_weights: torch.Tensor | None = None, grid: int = MSE_GRID,
                   octaves: int = MSE_OCTAVES) -> torch.Tensor:
    """The clip among ``amax * 2**(-i/grid)``, i = 0..grid*octaves, with the smallest
    :func:`input_clip_errors`; ties keep the larger clip. Same inputs, same device: same clip."""
    clips = [amax.float() * 2.0 ** (-i / grid) for i in range(grid * octaves + 1)]
    errs = input_clip_errors(rows, weight, clips, row_weights)
    best = min(range(len(clips)), key=lambda i: (errs[i], i))
    return clips[best].cpu()


# ---- percentile: |x| histogram on fixed edges (fp32 bit patterns), merged by summing counts ---------------------
PERCENTILE = 99.99
MANTISSA_BITS = 5  # 2**5 bins per octave, linear within it: a bin is at most 1/32 of its lower edge wide
_SHIFT = 23 - MANTISSA_BITS  # fp32: 23 mantissa bits; the bin is the pattern's top bits (exponent + 5 mantissa)
N_BINS = 1 << (31 - _SHIFT)  # every non-negative fp32 pattern (inf and NaN in the top bins)


def histogram_bins(a: torch.Tensor) -> torch.Tensor:
    """|x| values (fp32) -> bin indices: the top bits of the fp32 pattern, ``bits >> 18``. For positive floats the
    pattern orders as the value, so bin b holds exactly ``[edge(b), edge(b + 1))`` with ``edge(b)`` the float whose
    pattern is ``b << 18``: ``2**e * (1 + k/32)``, no rounding anywhere."""
    return a.float().contiguous().view(torch.int32).bitwise_and(0x7FFFFFFF).bitwise_right_shift_(_SHIFT)


def bin_upper_edge(b: int) -> float:
    """``edge(b + 1)``: the smallest float above every value of bin b."""
    return torch.tensor([(b + 1) << _SHIFT], dtype=torch.int32).view(torch.float32).item()


class PercentileObserver(MinMaxObserver):
    """Absmax plus a histogram of |x| on fixed edges (:func:`histogram_bins`: no edge depends on data, so ranks'
    counts add up exactly: int64, summed by one all_reduce). :meth:`select_clip`: the upper edge of the bin
    holding the ``q``-th percentile's order statistic (``torch.quantile(..., interpolation="higher")``), capped at
    the absmax: never below the exact percentile, at most one bin (1/32 of the value) above it."""

    def __init__(self, sample_rows: int = 32, q: float = PERCENTILE) -> None:
        super().__init__(sample_rows)
        if not 0.0 < q <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {q}")
        self.q = q
        self.hist = torch.zeros(N_BINS, dtype=torch.int64)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if x.numel():
            self.hist += torch.bincount(histogram_bins(x.detach()).reshape(-1), minlength=N_BINS).cpu()

    def counts(self) -> torch.Tensor | None:
        return self.hist

    def select_clip(self, weight: torch.Tensor) -> torch.Tensor:
        n = int(self.hist.sum())
        if n == 0:
            return self.amax
        k = math.ceil(self.q / 100.0 * (n - 1))  # 0-based order statistic of torch.quantile's "higher"
        b = int(torch.searchsorted(torch.cumsum(self.hist, 0), k + 1))  # first bin whose cumulative count > k
        return torch.minimum(torch.tensor(bin_upper_edge(b), dtype=torch.float32), self.amax.float())


ACTIVATION_OBSERVERS: dict[str, Callable[[], MinMaxObserver]] = {
    "minmax": MinMaxObserver,
    "mse": MSEObserver,
    "percentile": PercentileObserver,  # 99.99th percentile of |x|
}


def resolve_input_clips(modules: dict, observers: dict[str, MinMaxObserver]) -> None:
    """Before the static input scales are computed: each observer that saw tokens replaces its ``amax`` by the clip
    it selects given its module's weight (``observed_amax`` keeps the absmax). Idempotent; a no-op for minmax.
    Every rank holds the same merged statistics and weights, so every rank selects the same clip."""
    for name, obs in observers.items():
        if obs.tokens == 0 or hasattr(obs, "observed_amax") or type(obs).select_clip is MinMaxObserver.select_clip:
            continue
        clip = obs.select_clip(modules[name].weight)
        obs.observed_amax, obs.amax = obs.amax, clip


# fake_quant(groups [..., g], clip [...]) -> dequantized groups [..., g]: the scheme's round trip at a clip.
FakeQuant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def weight_clip_minmax(groups: torch.Tensor, fake_quant: FakeQuant) -> torch.Tensor:
    """Plain absmax over the last dim: groups [..., g] -> [...]."""
    return absmax(groups, dim=-1)


def weight_clip_mse(groups: torch.Tensor, fake_quant: FakeQuant, grid: int = 100, max_shrink: float = 0.2,
                    norm: float = 2.4) -> torch.Tensor:
    """Per group, the clip ``absmax * r`` (r from 1.0 down to ``1 - max_shrink`` in steps of 1/grid) with the
    smallest quantization error ``sum |w - q(w)|^norm``. r = 1 is a candidate, so that error is never worse
    than minmax's. The defaults are llm-compressor's MSE observer's (shrink at most 20%, norm 2.4): the
    exponent above 2 and the small shrink keep the largest weights, which matter most to the layer output,
    from being clipped to buy a lower plain MSE."""
    amax = absmax(groups, dim=-1)  # [...]
    best_clip = amax.clone()
    best_err = (fake_quant(groups, amax) - groups).abs().pow(norm).sum(dim=-1)
    for i in range(1, int(max_shrink * grid) + 1):
        clip = amax * (1 - i / grid)
        err = (fake_quant(groups, clip) - groups).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip


WEIGHT_OBSERVERS: dict[str, Callable[[torch.Tensor, FakeQuant], torch.Tensor]] = {
    "minmax": weight_clip_minmax,
    "mse": weight_clip_mse,
}
