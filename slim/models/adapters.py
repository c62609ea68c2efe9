"""Model adapters: how to build a model skeleton and walk it layer by layer, one registry entry per family.

Every supported family follows transformers' decoder layout (``model.embed_tokens``, ``model.layers``,
``model.norm``, ``model.rotary_emb``, ``lm_head``); adapters differ in which fused routed-expert module
transformers uses for the family (swapped for per-expert Linears named as on disk, see ``slim.models.moe``)
and which checkpoint tensors lie outside the main model (DeepSeek's multi-token-prediction layer).
Adding a family is adding one ``ADAPTERS`` entry.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from slim import collector
from slim.errors import SlimError
from slim.models.moe import unfuse_experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAdapter:
    """A transformers decoder: dense (Llama, Qwen2/3, Mistral) or, with ``fused_experts``, MoE."""

    name: str = "decoder"
    # "module.Class" of transformers' fused routed experts (3D gate_up_proj/down_proj) for this family
    fused_experts: str | None = None

    def prepare(self, model: PreTrainedModel) -> None:
        """Adjust a freshly built meta skeleton: routed experts become one Linear per expert projection."""
        if self.fused_experts:
            module, _, cls = self.fused_experts.rpartition(".")
            fused = getattr(importlib.import_module(module), cls, None)
            if fused is not None:  # older transformers keep a ModuleList of per-expert MLPs: nothing to do
                n = unfuse_experts(model, fused, model.config.hidden_act)
                log.debug("%s: unfused the routed experts of %d MoE layers", self.name, n)
        stacked = [n for n, p in model.named_parameters() if p.dim() > 2]
        if stacked:
            raise SlimError(
                f"{type(model).__name__} keeps expert weights stacked ({stacked[0]}, ...), which slim cannot quantize "
                f"per expert; set the fused_experts class of adapter {self.name!r} in slim/models/adapters.py for "
                "this transformers version"
            )

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def num_layers(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers

    def extra_layer_prefixes(self, config: PretrainedConfig) -> list[str]:
        """Checkpoint tensors outside the main model (skipped, or copied through on request)."""
        return []

    def head_modules(self, model: PreTrainedModel) -> dict[str, nn.Module]:
        """Modules before the decoder layers, by checkpoint prefix."""
        return {"model.embed_tokens.": model.model.embed_tokens}

    def tail_modules(self, model: PreTrainedModel) -> dict[str, nn.Module]:
        """Modules after the decoder layers, by checkpoint prefix."""
        return {"model.norm.": model.model.norm, "lm_head.": model.lm_head}

    def open_reader(self, reader, config: PretrainedConfig):
        """Adapt name lookups to how this family saves weights (tied embeddings are stored once)."""
        if getattr(config, "tie_word_embeddings", False):
            reader.tie("lm_head.weight", "model.embed_tokens.weight")
        return reader


@dataclass(frozen=True)
class DeepseekV3Adapter(ModelAdapter):
    """DeepSeek-V3/R1: MLA attention, dense first layers, shared + routed experts, optional MTP layers."""

    name: str = "deepseek_v3"
    fused_experts: str | None = "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts"

    def extra_layer_prefixes(self, config: PretrainedConfig) -> list[str]:
        n = getattr(config, "num_nextn_predict_layers", 0) or 0
        return [f"model.layers.{config.num_hidden_layers + i}." for i in range(n)]


ADAPTERS: dict[str, ModelAdapter] = {
    "deepseek_v3": DeepseekV3Adapter(),
    "llama": ModelAdapter(),
    "mistral": ModelAdapter(),
    "qwen2": ModelAdapter(),
    "qwen3": ModelAdapter(),
    # Qwen3-MoE: routed experts only (no shared expert); the router mlp.gate is not a Linear and stays as is;
    # layers in mlp_only_layers or off decoder_sparse_step are dense MLPs (mlp.gate_proj ...).
    "qwen3_moe": ModelAdapter(
        name="qwen3_moe", fused_experts="transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts"),
}


def adapter_for(config: PretrainedConfig) -> ModelAdapter:
    try:
        return ADAPTERS[config.model_type]
    except KeyError:
        raise SlimError(
            f"model_type {config.model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def check_architecture(path: str | Path) -> None:
    """Refuse, from config.json's text alone, a checkpoint that ships model code for an architecture slim does not
    support: before transformers reads the config or the tokenizer (either would import that code when
    ``trust_remote_code`` is on)."""
    raw = json.loads((Path(path) / "config.json").read_text())
    if raw.get("auto_map") and raw.get("model_type") not in ADAPTERS:
        raise SlimError(f"{path} ships its own model code (auto_map in config.json) for model_type "
                        f"{raw.get('model_type')!r}, which slim does not support; slim runs remote code "
                        "(model.trust_remote_code=true) only for an architecture it supports: "
                        + ", ".join(sorted(ADAPTERS)))


def load_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    check_architecture(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise SlimError(f"cannot read {path}/config.json: {exc}") from exc


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, ModelAdapter]:
    """The model with every weight on the meta device (no memory), prepared by its adapter.

    Built with ``from_config(dtype=...)``: casting a built model with ``.to(bf16)`` would corrupt buffers
    that must stay fp32 (rotary ``inv_freq``, DeepSeek's router correction bias).
    """
    adapter = adapter_for(config)
    with collector.paused():  # DeepSeek-R1's: over a million objects, no garbage (slim.collector)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        adapter.prepare(model)
        # Non-persistent buffers (rotary frequencies) are computed, not loaded: rebuild them for real.
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=model.config)
    return model, adapter
