"""Layer-sequential calibration: the calibration set's hidden states walk through the model one layer at a time.

Only the current decoder layer's weights are resident; the hidden states of all samples are kept between
layers, on the compute device or, when they do not fit there, in host memory (``store_device``: each batch
then visits the device for its forward pass). ``observe`` hooks the inputs of the target Linears of one layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from slim.errors import SlimError
from slim.models.moe import UnfusedExperts
from slim.quant.observers import ACTIVATION_OBSERVERS, MinMaxObserver
from slim.quant.stats import all_finite


class LayerRunner:
    """Runs batches of hidden states through single decoder layers of a (mostly meta) model."""

    def __init__(self, model: PreTrainedModel, device: torch.device, store_device: torch.device | None = None):
        self.model = model
        self.device = device
        self.store_device = store_device or device  # where hidden states wait between layers
        self._kwargs_cache: dict[tuple, dict] = {}

    def embed(self, input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """[N, T] token ids -> list of [b, T, H] hidden states (the embedding must be materialized)."""
        embed = self.model.model.embed_tokens
        return [embed(chunk.to(self.device)).to(self.store_device) for chunk in input_ids.split(batch_size)]

    def _layer_kwargs(self, hidden: torch.Tensor) -> dict:
        key = (tuple(hidden.shape), hidden.dtype)
        if key not in self._kwargs_cache:
            b, t, _ = hidden.shape
            position_ids = torch.arange(t, device=self.device).unsqueeze(0).expand(b, -1)
            self._kwargs_cache[key] = {
                "position_embeddings": self.model.model.rotary_emb(hidden, position_ids),
                "attention_mask": create_causal_mask(
                    config=self.model.config,
                    inputs_embeds=hidden,
                    attention_mask=None,
                    cache=None,
                    position_ids=position_ids,
                ),
                "position_ids": position_ids,
            }
        return self._kwargs_cache[key]

    @torch.no_grad()
    def forward(self, layer: nn.Module, hidden: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        outputs = []
        for h in hidden:
            h = h.to(self.device)
            out = layer(h, **self._layer_kwargs(h))
            out = out[0] if isinstance(out, tuple) else out
            if not all_finite(out):
                raise SlimError(
                    f"calibration activations became NaN/Inf in {name}; check this layer's weights in the "
                    "checkpoint, or calibrate in a wider dtype (model.dtype=float32)"
                )
            outputs.append(out.to(self.store_device))
        return outputs


@contextlib.contextmanager
def observe(modules: dict[str, nn.Linear], observer: str = "minmax") -> Iterator[dict[str, MinMaxObserver]]:
    """Attach an input observer to each Linear for the duration of the block."""
    observers = {name: ACTIVATION_OBSERVERS[observer]() for name in modules}
    handles = [
        mod.register_forward_pre_hook(lambda _m, args, obs=observers[name]: obs.update(args[0]))
        for name, mod in modules.items()
    ]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def route_all(layer: nn.Module, enabled: bool) -> Iterator[None]:
    """Let every routed expert of ``layer`` see every token (outputs unchanged) while enabled."""
    experts = [m for m in layer.modules() if isinstance(m, UnfusedExperts)]
    for m in experts:
        m.route_all = enabled
    try:
        yield
    finally:
        for m in experts:
            m.route_all = False
