"""Can SGLang or TensorRT-LLM serve this w4afp8 checkpoint with this parallel layout on this GPU? (stdlib only)

    python experiments/deploy/w4afp8_check.py CKPT --engine sglang|trtllm --tp N --ep N [--capability 9.0]

Exit 0 and one summary line when it can; exit 2 and one line naming the fix when it cannot. The rules, from the
engines' loaders (read in their source; see docs/w4afp8.md):
- capability: SGLang ``W4AFp8Config.get_min_capability`` is 90 and its ``cutlass_w4a8_moe`` kernels are Hopper's
  (sm90a); TensorRT-LLM ``WInt4AFP8FusedMoEMethod.create_weights`` raises on anything but SM89 and SM90.
- per-partition widths: experts are split over ``tp / ep`` ranks (moe tensor parallel), so each rank holds
  ``moe_intermediate_size / (tp / ep)`` rows of gate/up and columns of down. Both engines need every K of the int4
  GEMMs (hidden_size and that width) a multiple of 128 (one scale per group; TensorRT-LLM: "K shape is required to
  be multiple of 128"); SGLang's kernel takes scales interleaved by 4 groups ([E, K // 512, N * 8] in
  ``cutlass_w4a8_moe``), so it needs multiples of 512.
- expert parallelism: ``ep`` divides ``tp`` and the number of routed experts.
- attention heads split over ``tp``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

K_MULTIPLE = {"sglang": 512, "trtllm": 128}
CAPABILITIES = {"sglang": ("9.0",), "trtllm": ("8.9", "9.0")}


def problems(config: dict, engine: str, tp: int, ep: int, capability: str | None) -> list[str]:
    q = config.get("quantization_config") or {}
    out = []
    if q.get("quant_method") != "w4afp8":
        out.append(f"config.json quantization_config.quant_method is {q.get('quant_method')!r}, not 'w4afp8': export "
                   "it with scheme=w4a8 scheme.format=w4afp8 (this layout is the one both engines load)")
        return out
    if capability is not None and capability not in CAPABILITIES[engine]:
        out.append(f"GPU compute capability {capability}: {engine}'s W4AFP8 MoE kernels run on "
                   f"{' / '.join(CAPABILITIES[engine])} only (Hopper{'' if engine == 'sglang' else ' or Ada'})")
    if tp % ep:
        out.append(f"--ep {ep} must divide --tp {tp} (experts are split over ep ranks, each group of tp/ep ranks "
                   "shares an expert's rows)")
        return out
    experts = config.get("n_routed_experts") or 0
    if experts % ep:
        out.append(f"--ep {ep} does not divide the {experts} routed experts; choose a divisor of {experts}")
    heads = config.get("num_attention_heads") or 1
    if heads % tp:
        out.append(f"--tp {tp} does not divide num_attention_heads {heads}")
    moe_tp, k = tp // ep, K_MULTIPLE[engine]
    width = (config.get("moe_intermediate_size") or 0) / moe_tp
    if width != int(width) or int(width) % k:
        fix = f"use expert parallelism (--ep {tp}: whole experts per rank)" if ep != tp else "lower --tp"
        out.append(f"each of the tp/ep = {moe_tp} ranks sharing an expert would hold {width:g} of its "
                   f"moe_intermediate_size {config.get('moe_intermediate_size')}; {engine}'s int4 kernels need a "
                   f"multiple of {k}: {fix}")
    if (config.get("hidden_size") or 0) % k:
        out.append(f"hidden_size {config.get('hidden_size')} is not a multiple of {k}: {engine} cannot run this model")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--engine", choices=sorted(K_MULTIPLE), required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--capability", default=None, help="GPU compute capability, e.g. 9.0 (default: not checked)")
    a = p.parse_args(argv)
    try:
        config = json.loads((a.checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {a.checkpoint / 'config.json'}: {exc}", file=sys.stderr)
        return 2
    if a.tp < 1 or a.ep < 1:
        print("--tp and --ep must be >= 1", file=sys.stderr)
        return 2
    found = problems(config, a.engine, a.tp, a.ep, a.capability)
    if a.engine == "trtllm":
        for name in ("hf_quant_config.json", "quant_cfg.json"):
            if not (a.checkpoint / name).is_file():
                found.append(f"{name} is missing: TensorRT-LLM reads the MIXED_PRECISION layout from it (re-export "
                             "with slim: it writes both)")
    if found:
        print("; ".join(found), file=sys.stderr)
        return 2
    print(f"{config.get('architectures', ['?'])[0]} w4afp8: {config.get('n_routed_experts')} experts over ep={a.ep}, "
          f"moe tensor parallel {a.tp // a.ep}, attention tp={a.tp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
