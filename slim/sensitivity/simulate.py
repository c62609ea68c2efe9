"""The in-memory model whose Linears can be swapped for their quantized simulation, and its losses."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from slim.calibration.runner import LayerRunner, observe, route_all
from slim.config import SlimConfig
from slim.errors import SlimError
from slim.models.simulated import SimQuantLinear, swap_in
from slim.quant.schemes import Scheme
from slim.quant.types import QuantizedLinear


def text_tokens(path: Path, field_name: str, tokenizer, seq_len: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Held-out documents joined with EOS, cut into [1, <=seq_len] chunks (the last one may be shorter)."""
    if not path.is_file():
        raise SlimError(f"held-out text {path} does not exist; set sensitivity.heldout_path=<file.jsonl>")
    stream: list[int] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if field_name not in record:
            raise SlimError(f"{path}:{lineno} has no field {field_name!r}; set sensitivity.heldout_text_field")
        stream += tokenizer(str(record[field_name]), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if max_tokens and len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens] if max_tokens else stream
    if len(stream) < 2:
        raise SlimError(f"held-out text {path} has fewer than 2 tokens")
    ids = torch.tensor(stream, dtype=torch.long)
    return [c.unsqueeze(0) for c in ids.split(seq_len) if c.numel() > 1]


def batches(chunks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """[1, T] chunks -> [b, T] batches of equal length (order kept)."""
    out: list[torch.Tensor] = []
    for c in chunks:
        if out and out[-1].shape[1] == c.shape[1] and out[-1].shape[0] < batch_size:
            out[-1] = torch.cat([out[-1], c])
        else:
            out.append(c)
    return out


class SimulatedModel:
    """An in-memory model whose target Linears can be swapped for their quantized simulation, and the losses."""

    def __init__(self, model, adapter, scheme: Scheme, cfg: SlimConfig, device: torch.device):
        self.model, self.adapter, self.scheme, self.cfg = model, adapter, scheme, cfg
        self.layers = adapter.layers(model)
        self.prefixes = [adapter.layer_prefix(i) for i in range(len(self.layers))]
        self.runner = LayerRunner(model, device)
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.amax: dict[str, torch.Tensor] = {}
        self.fallbacks: set[str] = set()
        self._q: dict[str, QuantizedLinear] = {}

    def embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        emb = self.model.model.embed_tokens
        with torch.no_grad():
            return [emb(b.to(self.runner.device)) for b in ids]

    def calibrate(self, ids: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Observe every Linear's inputs over the calibration batches; return each layer's inputs (+ final)."""
        from slim.quant.observers import ACTIVATION_OBSERVERS, resolve_input_clips
        from slim.quantize import resolve_amax

        obs_name = self.cfg.scheme.activation_observer
        inputs = [self.embed(ids)]
        observers = {}
        for i, layer in enumerate(tqdm(self.layers, desc="calibrate layers", unit="layer", leave=False)):
            mods = {n: m for n, m in self.linears.items() if n.startswith(self.prefixes[i])}
            with observe(mods, obs_name) as obs, route_all(layer, self.cfg.calibration.route_all_experts):
                inputs.append(self.runner.forward(layer, inputs[-1], self.prefixes[i].rstrip(".")))
            observers.update(obs)
        rest = {n: m for n, m in self.linears.items() if n not in observers}  # lm_head: input is the final norm's output
        with torch.no_grad():
            for n in rest:
                observers[n] = ACTIVATION_OBSERVERS[obs_name]()
                for h in inputs[-1]:
                    observers[n].update(self.model.model.norm(h))
        if self.scheme.static_activations:
            resolve_input_clips(self.linears, observers)  # mse/percentile: the clip their input scale comes from
            self.amax, self.fallbacks = resolve_amax(observers)
        return inputs

    def quantized(self, name: str) -> QuantizedLinear:
        if name not in self._q:
            from slim.formats import FORMATS

            fmt = FORMATS.get(self.cfg.scheme.format)
            self._q[name] = self.scheme.quantize(self.linears[name].weight, self.amax.get(name), self.cfg.scheme.group_size,
                                                 self.cfg.scheme.weight_observer, getattr(fmt, "group_scale_dtype", None))
        return self._q[name]

    def forget(self) -> None:
        """Drop the cached quantized weights (streaming: once their layer is done)."""
        self._q.clear()

    @contextlib.contextmanager
    def simulate(self, names: set[str]):
        """Inside the block, the Linears ``names`` compute with their quantized values."""
        originals = {n: swap_in(self.model, n, SimQuantLinear(self.quantized(n), self.linears[n].bias)) for n in sorted(names)}
        try:
            yield
        finally:
            for n, m in originals.items():
                swap_in(self.model, n, m)

    @torch.no_grad()
    def nll_per_sample(self, hidden: list[torch.Tensor], labels: list[torch.Tensor], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token NLL sums and token counts per sequence ([N] each, fp32 log-softmax), running ``hidden``
        (the inputs of layer ``start``) through the rest of the model."""
        for i in range(start, len(self.layers)):
            hidden = self.runner.forward(self.layers[i], hidden, self.prefixes[i].rstrip("."))
        sums, counts = [], []
        for h, y in zip(hidden, labels):
            logits = self.model.lm_head(self.model.model.norm(h)).float()  # [b, T, V]
            y = y.to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), y[:, 1:], reduction="none")  # [b, T-1]
            sums.append(nll.sum(dim=1).cpu())
            counts.append(torch.full((y.shape[0],), y.shape[1] - 1))
        return torch.cat(sums), torch.cat(counts)

    def nll(self, hidden: list[torch.Tensor], labels: list[torch.Tensor], start: int = 0) -> float:
        """Mean next-token NLL over all tokens."""
        sums, counts = self.nll_per_sample(hidden, labels, start)
        return float(sums.sum() / counts.sum())
