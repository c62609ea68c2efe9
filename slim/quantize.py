"""Quantizing one layer's target Linears and writing all of its tensors (:class:`LayerQuantizer`), the kernel queue
of the streamed CPU weight path, and the per-module records. The loop over layers is :mod:`slim.layer_loop`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slim import kernels
from slim.errors import SlimError
from slim.export import CheckpointWriter
from slim.formats.base import check_group_size
from slim.hostmem import TensorPool
from slim.models.checkpoint import BLOCK_SCALE_SUFFIX, DECODE_CHUNK_BYTES, CheckpointReader, nonfinite_error
from slim.models.materialize import check_shape
from slim.quant.blockwise import CPU_BLOCK, Quality, quantize_blockwise
from slim.quant.fp8 import FP8_DTYPE, fake_quantize_input
from slim.models.input_scales import merge_input_amax
from slim.quant.observers import MinMaxObserver, resolve_input_clips
from slim.quant.schemes import Scheme, dequantize_weight
from slim.quant.stats import all_finite
from slim.quant.types import QuantizedLinear
from slim.targets import ROUTED_EXPERT_RE, module_kind

log = logging.getLogger(__name__)
# streamed weights (calibration off, CPU kernels): kernels queued ahead of the Linear being reported and written,
# at least STREAM_AHEAD Linears, more while their results hold at most STREAM_AHEAD_BYTES (KernelQueue). A layer's
# kernels are queued before its other tensors are written, so the kernel threads work while the main thread writes
# those (queuing them only afterwards left the kernel threads idle meanwhile). The byte bound keeps many small
# experts in flight and only the minimum of large ones (an R1 expert's packed result is several MB).
STREAM_AHEAD = 2
STREAM_AHEAD_BYTES = 16 << 20
_NO_SOURCE: frozenset[str] = frozenset()  # the reader a format's rest_tensors sees for a changed tensor: no bytes


def kernel_path(calibrate: bool, device_type: str, cpu_kernels: bool | None = None) -> bool:
    """Calibration off on a CPU with the kernels (``hardware.cpu_kernels`` not false, and built): nothing runs a
    layer, the kernels do the weight work on their own threads and torch only small ops. From block FP8 the
    layer's weights then stream from the mapped codes (:func:`streamed_params`) and the main thread writes.
    The pipeline, the quantize loop and ``mode=plan`` decide by this one test."""
    return not calibrate and device_type == "cpu" and cpu_kernels is not False and kernels.library() is not None


@dataclass
class ModuleReport:
    name: str
    in_features: int
    out_features: int
    tokens: int
    input_amax: float | None
    input_scale: float | None
    weight_scale_max: float
    weight_scale_min: float
    sqnr_db: float
    fallback: bool = False
    kind: str = ""
    output_rel_err: float | None = None  # ||y_q - y|| / ||y|| on the first calibration rows it saw
    # what decided the codes (slim.algorithms): rtn | gptq | rtn-fallback (the algorithm's reason in algorithm_note);
    # rtn_output_rel_err: RTN's output error on the same rows, where an algorithm replaced it (weights only)
    algorithm: str = "rtn"
    algorithm_note: str = ""
    rtn_output_rel_err: float | None = None


@dataclass
class QuantizeResult:
    modules: list[ModuleReport] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ignore_matches: dict[str, list[str]] = field(default_factory=dict)
    skipped_prefixes: list[str] = field(default_factory=list)
    num_samples: int = 0
    # wall seconds of each decoder layer this process ran (materialize, calibrate, quantize, its writes on disk,
    # commit point), keyed by the layer's prefix: the steady rate of a deep model, without startup
    layer_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[str]:
        return [m.name for m in self.modules if m.fallback]

    def to_dict(self) -> dict:
        return {
            "modules": [asdict(m) for m in self.modules],
            "ignored": self.ignored,
            "ignore_matches": self.ignore_matches,
            "fallbacks": self.fallbacks,
            "skipped_prefixes": self.skipped_prefixes,
            "num_samples": self.num_samples,
            "layer_seconds": self.layer_seconds,
        }


def check_group_sizes(targets: dict[str, nn.Linear], group_size: int) -> None:
    """Every quantized Linear must split into whole groups; the error names the layer and the fix."""
    for name, mod in targets.items():
        try:
            check_group_size(name, mod.in_features, group_size)
        except ValueError as exc:
            raise SlimError(str(exc)) from None


def resolve_amax(observers: dict[str, MinMaxObserver]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Observed amax per module; an expert that saw no token takes the max over its layer's experts
    (same projection), flagged as fallback. Never 1.0, never 0."""
    amax = {n: o.amax for n, o in observers.items() if o.tokens > 0}
    fallback: set[str] = set()
    for name, obs in observers.items():
        if obs.nonfinite:
            raise SlimError(f"calibration inputs of {name} contain NaN/Inf; check the checkpoint and calibration data")
        if obs.tokens > 0:
            continue
        group = ROUTED_EXPERT_RE.sub(".experts.*.", name)
        peers = [amax[n] for n in amax if ROUTED_EXPERT_RE.sub(".experts.*.", n) == group and n != name]
        if name == group or not peers:
            raise SlimError(
                f"{name} received no calibration token and has no calibrated sibling expert; "
                "raise calibration.num_samples or set calibration.route_all_experts=true"
            )
        amax[name] = torch.stack(peers).max()
        fallback.add(name)
    return amax, fallback


def streamed_params(module: nn.Module, prefix: str, reader: CheckpointReader) -> frozenset[str]:
    """The parameters of ``module`` stored as block FP8, which a run with calibration off leaves in the checkpoint
    (materialize's ``skip``): quantized targets go from the FP8 codes to int4 in one pass
    (``LayerQuantizer._start_streamed``), the rest are decoded into the writer a block of rows at a time
    (``write_rest``). A layer's weights are then never held whole in the model dtype."""
    return frozenset(n for n in (prefix + local for local, _ in module.named_parameters())
                     if reader.is_block_fp8_tensor(n))


def streamed_int4(scheme: Scheme, fmt, group_size: int | None, weight_observer: str) -> tuple[bool, bool]:
    """How the streamed weight path (``LayerQuantizer._start_streamed``) quantizes a block-FP8 weight:
    ``(fused, packed)``. fused: int4 with the minmax observer goes from the FP8 codes to int4 in one pass of the
    kernel, on its worker threads, the weight never held in the model dtype. packed: that pass also packs the
    codes into the format's int32 words (the format stores packed words, the groups are whole words), and the int8
    codes are then not stored at all. Not fused: the weight is materialized in the model dtype, one at a time,
    when its result is asked for. ``mode=plan`` counts the bytes in flight from the same answer."""
    fused = scheme.weight_bits == 4 and weight_observer == "minmax"
    return fused, fused and fmt.packs_int4 and group_size % 8 == 0


class KernelQueue:
    """Streamed Linears whose kernels are queued (``start(name, mod)`` returns the call that gives the result), in
    the order they are added, ahead of the one being reported and written: at least :data:`STREAM_AHEAD`, more
    while the queued results hold at most :data:`STREAM_AHEAD_BYTES` (``nbytes(mod)`` each). So the results a
    layer holds at once are bounded whatever its width, and a layer of small Linears keeps the kernel threads busy
    while the main thread writes."""

    def __init__(self, start: Callable[[str, nn.Linear], Callable], nbytes: Callable[[nn.Linear], int]):
        self._start, self._nbytes = start, nbytes
        self._todo: deque[tuple[str, nn.Linear]] = deque()
        self._queued: deque[tuple[str, Callable, int]] = deque()
        self._names: set[str] = set()  # todo and queued
        self.held = 0  # bytes of the queued results

    def add(self, name: str, mod: nn.Linear) -> None:
        if name not in self._names:
            self._names.add(name)
            self._todo.append((name, mod))
            self._fill()

    def _fill(self) -> None:
        while self._todo:
            n = self._nbytes(self._todo[0][1])
            if len(self._queued) >= STREAM_AHEAD and self.held + n > STREAM_AHEAD_BYTES:
                return
            name, mod = self._todo.popleft()
            self._queued.append((name, self._start(name, mod), n))
            self.held += n

    def take(self, name: str) -> Callable:
        """The call for ``name``, the oldest one added; the next ones are queued before it is returned."""
        if not self._queued or self._queued[0][0] != name:
            raise RuntimeError(f"{name} is not the next streamed Linear queued "
                               f"({self._queued[0][0] if self._queued else 'none'} is)")
        _, result, n = self._queued.popleft()
        self._names.discard(name)
        self.held -= n
        self._fill()
        return result

    def __len__(self) -> int:
        return len(self._queued) + len(self._todo)


class LayerQuantizer:
    """Quantizes the target Linears of one module tree and writes all of its tensors."""

    def __init__(self, scheme: Scheme, fmt, writer: CheckpointWriter, reader: CheckpointReader,
                 group_size: int | None, weight_observer: str, result: QuantizeResult, owned: set[str],
                 writes_rest: bool = True):
        self.scheme, self.fmt, self.writer, self.reader = scheme, fmt, writer, reader
        self.group_size, self.weight_observer, self.result = group_size, weight_observer, result
        self.owned, self.writes_rest = owned, writes_rest  # what this rank writes
        self._fused, self._pack = streamed_int4(scheme, fmt, group_size, weight_observer)
        self._queue = KernelQueue(self._start_streamed, self._result_bytes)
        self._pool = TensorPool(STREAM_AHEAD_BYTES)  # the kernels' outputs, reused once written
        # routed experts' input scales: expert | layer_max (export.moe_input_scale, resolved by quantize_model), and
        # the dtype the format stores them in exactly (None: fp32)
        self.moe_input_scale = "expert"
        self._input_scale_dtype = getattr(fmt, "input_scale_dtype", None)

    def start(self, modules: dict[str, nn.Linear], everything: bool = False) -> None:
        """Queue the kernels of the streamed Linears among ``modules`` (weights left in the checkpoint, see
        :func:`streamed_params`) that :meth:`quantize` will ask for, as many as :class:`KernelQueue` allows now:
        they run while the caller writes the layer's other tensors. :meth:`quantize` queues them too."""
        for name, mod in modules.items():
            if mod.weight.is_meta and (everything or name in self.owned):
                self._queue.add(name, mod)

    def _result_bytes(self, mod: nn.Linear) -> int:
        """What a queued kernel's result holds: the packed words or the int8 codes, and the group scales."""
        if not self._fused:
            return 0  # materialized when its result is asked for
        n = mod.in_features * mod.out_features
        scale_bytes = (self._scale_dtype or torch.float32).itemsize
        return (n // 2 if self._pack else n) + n // self.group_size * scale_bytes

    def quantize(self, modules: dict[str, nn.Linear], observers: dict[str, MinMaxObserver],
                 static: bool, everything: bool = False, solved: dict | None = None) -> dict[str, QuantizedLinear]:
        """Quantize and write the modules this rank owns. With ``everything`` (propagation) it quantizes all of
        them and returns their QuantizedLinears; otherwise each is dropped once written (a layer's int4/FP8
        codes are a byte per weight: keeping them would add half a bf16 layer to the peak). ``solved``: the
        algorithm's codes and scales per module (:class:`slim.algorithms.gptq.Solved`), written as they are with
        the input scale from the observers; their quality is measured against the original weight."""
        solved = solved or {}
        if static:  # activation observers that choose a clip given the weight (mse, percentile); minmax: no-op
            resolve_input_clips(modules, observers)
        amax, fallback = resolve_amax(observers) if static else ({}, set())
        # what the scales are computed from; ``amax`` (each module's observed value) goes to modules.json
        scale_amax = merge_input_amax(amax, self.moe_input_scale, self._input_scale_dtype) if amax else amax
        if fallback:
            log.warning("%d expert projection(s) saw no calibration token, e.g. %s; used the max over their "
                        "layer's experts", len(fallback), min(fallback))
        out = {}

        def finish(name: str, mod: nn.Linear, q: QuantizedLinear, quality: Quality) -> None:
            sol = solved.get(name)
            if everything:
                out[name] = q
            if name not in self.owned:
                return
            self.writer.add_all(self.fmt.tensors(name, q))
            obs_amax = amax.get(name)
            scale_min, scale_max = (float(v) for v in torch.aminmax(q.weight_scale))  # one pass, not two
            self.result.modules.append(ModuleReport(
                name=name, in_features=mod.in_features, out_features=mod.out_features,
                tokens=observers[name].tokens,
                input_amax=None if obs_amax is None else float(obs_amax),
                input_scale=None if q.input_scale is None else float(q.input_scale),
                weight_scale_max=scale_max, weight_scale_min=scale_min,
                sqnr_db=quality.sqnr_db, fallback=name in fallback, kind=module_kind(name),
                output_rel_err=quality.output_rel_err,
                **({} if sol is None else {"algorithm": sol.algorithm, "algorithm_note": sol.reason,
                                           "rtn_output_rel_err": sol.rtn_output_rel_err}),
            ))

        # streamed weights: the queued kernels run on the kernel worker threads while this thread reports one and
        # writes it (on two cores they overlap); modules finish in order
        self.start(modules, everything)
        for name, mod in modules.items():
            if name not in self.owned and not everything:
                continue
            if mod.weight.is_meta:  # left in the checkpoint by materialize (see streamed_params)
                q, quality = self._queue.take(name)()
                finish(name, mod, q, quality)
                if self._fused and not everything and not self.writer.background:  # the kernel's outputs,
                    self._pool.give(q.weight, q.packed, q.weight_scale)  # written, and nothing else holds them
                continue
            block = CPU_BLOCK if mod.weight.device.type == "cpu" else None  # devices: whole tensors
            sol = solved.get(name)
            if sol is not None and sol.weight is not None:
                finish(name, mod, *self._from_solved(mod, sol, scale_amax.get(name), observers[name].sample))
                continue
            finish(name, mod, *quantize_blockwise(self.scheme, mod.weight, scale_amax.get(name), self.group_size,
                                                  self.weight_observer, self._scale_dtype, observers[name].sample,
                                                  block))
        return out

    def _from_solved(self, mod: nn.Linear, sol, input_amax: torch.Tensor | None, sample: torch.Tensor | None
                     ) -> tuple[QuantizedLinear, Quality]:
        """The algorithm's codes and scales with this module's input scale, and their quality against the original
        weight (SQNR; output error on ``sample`` with inputs quantized as exported), a block of rows at a time."""
        q = QuantizedLinear(sol.weight.to(mod.weight.device), sol.weight_scale.to(mod.weight.device),
                            self.scheme.input_scale(input_amax), self.scheme.weight_bits,
                            self.group_size if self.scheme.per_group else None)
        quality, x, xq = Quality(), None, None
        if sample is not None and sample.numel():
            x = sample.float().to(mod.weight.device)
            xq = fake_quantize_input(x, q.input_scale)
        rows = max(1, CPU_BLOCK // max(mod.in_features, 1))
        for r in range(0, mod.out_features, rows):
            part = QuantizedLinear(q.weight[r : r + rows], q.weight_scale if not self.scheme.per_group
                                   else q.weight_scale[r : r + rows], None, q.weight_bits, q.group_size)
            quality.add(mod.weight[r : r + rows].float(), dequantize_weight(part, torch.float32), x, xq)
        return q, quality

    @property
    def _scale_dtype(self) -> torch.dtype | None:
        return getattr(self.fmt, "group_scale_dtype", None)

    def _start_streamed(self, name: str, mod: nn.Linear) -> Callable[[], tuple[QuantizedLinear, Quality]]:
        """Start quantizing a weight left in the checkpoint as block FP8 (see :func:`streamed_params`); the
        returned call gives the result. int4 with the minmax observer goes from the FP8 codes to int4 in one pass
        of the fused kernel, on the kernels' worker threads (``kernels.fp8_block_int4_submit``), the weight never
        held in the model dtype; anything else is materialized and quantized when the result is asked for. The
        same bytes either way, the same refusal of NaN/Inf."""
        wname = f"{name}.weight"
        fp8 = self.reader.raw(wname)  # the stored FP8 codes, mapped
        check_shape(wname, tuple(fp8.shape), (mod.out_features, mod.in_features))
        # packed: only the words go to disk, so the int8 codes are not stored (QuantizedLinear.weight is then meta)
        kernel = kernels.fp8_block_int4_submit(fp8, self.reader.raw(wname + BLOCK_SCALE_SUFFIX), self.reader.block,
                                               mod.weight.dtype, self.group_size, self._scale_dtype,
                                               self._pack, codes=not self._pack,
                                               empty=self._pool.empty) if self._fused else None

        def result() -> tuple[QuantizedLinear, Quality]:
            out = None if kernel is None else kernel()
            if out is None:
                weight = self.reader.get(wname, mod.weight.dtype)
                if not all_finite(weight):
                    raise nonfinite_error(wname, int((~torch.isfinite(weight)).sum()), self.reader)
                return quantize_blockwise(self.scheme, weight, None, self.group_size, self.weight_observer,
                                          self._scale_dtype, block=CPU_BLOCK)
            q_codes, scale, signal, noise, nonfinite, *packed = out
            if nonfinite:
                raise nonfinite_error(wname, nonfinite, self.reader)
            q = QuantizedLinear(q_codes, scale, self.scheme.input_scale(None), 4, self.group_size,
                                packed=packed[0] if packed else None)
            return q, Quality(signal=signal, noise=noise)

        return result

    @property
    def group_scale_dtype(self) -> torch.dtype | None:
        """The dtype the format stores int4 group scales in (None: fp32)."""
        return self._scale_dtype

    def write_rest(self, module: nn.Module, prefix: str, quantized: set[str], changed: set[str] = frozenset()) -> None:
        """Every other tensor of ``module``: bit-exact from the source unless it was block-FP8 (then dequantized).

        ``changed``: tensors an algorithm changed before observing (AWQ's smoothed norms and unquantized consumers:
        router, ignored projections). They are written from their values in memory, never the source's bytes: in
        the source's dtype where that is a float dtype, in the model dtype where the source was block FP8 (as any
        block-FP8 tensor is), and by a format with its own layout for unquantized Linears (w4afp8: block FP8) from
        those values, quantized again. Same shapes and dtypes, so the same bytes as without the algorithm."""
        if not self.writes_rest:
            return
        own_layout = getattr(self.fmt, "rest_tensors", None)  # formats that store unquantized Linears their way
        for local, tensor in module.state_dict().items():
            name = prefix + local
            if name.endswith(".weight") and name[: -len(".weight")] in quantized:
                continue
            if name in self.reader.aliases:  # a tied copy (tie_word_embeddings): stored once, as in the source
                continue
            source = _NO_SOURCE if name in changed else self.reader  # a changed tensor has no source bytes
            if own_layout is not None and (tensors := own_layout(name, tensor, source)) is not None:
                self.writer.add_all(tensors)
                continue
            if name in changed:
                stored = self.reader.raw(name).dtype if name in self.reader else tensor.dtype
                self.writer.add(name, tensor if stored == FP8_DTYPE else tensor.to(stored))
                continue
            if tensor.is_meta:  # left in the checkpoint as block FP8: decoded a block of rows at a time
                check_shape(name, tuple(self.reader.raw(name).shape), tuple(tensor.shape))
                pieces = self.reader.decoded_chunks(name, tensor.dtype)  # one DECODE_CHUNK_BYTES buffer
                self.writer.add_pieces(name, tensor.dtype, tuple(tensor.shape), pieces, held_bytes=DECODE_CHUNK_BYTES)
                continue
            if name in self.reader:
                raw = self.reader.raw(name)
                if raw.dtype != FP8_DTYPE:  # copy the stored bytes; block-FP8 ones stay dequantized
                    tensor = raw
            self.writer.add(name, tensor)
