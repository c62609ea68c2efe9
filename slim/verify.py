"""Check an exported checkpoint: complete, uncorrupted, and every quantized module with sane scales.

    python -m slim.verify <checkpoint dir> [--no-checksums]

Checks that config.json, the index and every shard it names exist and parse; that the shards hold exactly the
tensors the index names; that each tensor's bytes match their digest in ``slim_manifest.json`` (XXH3-128 or
sha256, as the manifest's ``algorithm`` says; ``slim.checksum``); and that every
quantized weight has its scales, finite, positive and not the 1.0 placeholder. Exit 0 when all holds, 1 with one
line per problem otherwise, 2 when the directory is not a checkpoint at all.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from slim import checksum
from slim.errors import SlimError
from slim.export import INDEX, MANIFEST

SCALE_SUFFIXES = (".weight_scale", ".input_scale")
QUANTIZED_WEIGHT_SUFFIXES = (".weight_packed", ".weight")
CHUNK = 64 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"header length {n} is implausible")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_digest(f, start: int, end: int, algorithm: str) -> str:
    h = checksum.new(algorithm)
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def static_input_scales(config: dict) -> bool:
    """Does the checkpoint's quantization_config promise a static input_scale per quantized Linear?"""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") == "fp8":
        return q.get("activation_scheme") == "static"
    groups = (q.get("config_groups") or {}).values()
    return any((g.get("input_activations") or {}).get("dynamic") is False for g in groups)


def check_scale(name: str, t: torch.Tensor) -> str | None:
    t = t.float()
    if not torch.isfinite(t).all():
        return f"{name}: {int((~torch.isfinite(t)).sum())} non-finite value(s)"
    if (t <= 0).any():
        return f"{name}: {int((t <= 0).sum())} value(s) <= 0"
    if (t == 1.0).all():
        return f"{name}: every value is exactly 1.0 (an uncalibrated placeholder)"
    return None


def verify(path: str | Path, checksums: bool = True) -> tuple[list[str], dict]:
    """Problems found (empty when the checkpoint is good) and a summary."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SlimError(f"{path} has no config.json: not a checkpoint, or an unfinished export")
    if not (path / INDEX).is_file():
        raise SlimError(f"{path} has no {INDEX}; slim writes sharded checkpoints with an index")
    config = json.loads((path / "config.json").read_text())
    weight_map: dict[str, str] = json.loads((path / INDEX).read_text())["weight_map"]
    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else None
    problems: list[str] = []
    algorithm = manifest.get("algorithm", "sha256") if manifest else None
    if manifest is None:
        problems.append(f"{MANIFEST} is missing: tensor checksums cannot be checked")
    elif algorithm not in checksum.ALGORITHMS:
        problems.append(f"{MANIFEST}: checksum algorithm {algorithm!r} is unknown to this slim "
                        f"(it knows {', '.join(checksum.ALGORITHMS)}); tensor checksums cannot be checked")
    checkable = bool(manifest) and checksums and algorithm in checksum.ALGORITHMS
    found: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    for fname in tqdm(sorted(set(weight_map.values())), desc="verify shards", unit="shard", leave=False):
        shard = path / fname
        if not shard.is_file():
            problems.append(f"{fname}: named by the index but missing")
            continue
        size = shard.stat().st_size
        try:
            header, data_start = read_header(shard)
            need = data_start + max((i["data_offsets"][1] for i in header.values()), default=0)
            if need > size:
                problems.append(f"{fname}: truncated: {size} bytes, its header describes {need}")
                continue
            with safe_open(str(shard), "pt"):  # the reference parser accepts it too
                pass
        except Exception as exc:  # noqa: BLE001 - any parse failure is a finding
            problems.append(f"{fname}: not a readable safetensors file ({exc})")
            continue
        if manifest and manifest["files"].get(fname, {}).get("bytes") not in (None, size):
            problems.append(f"{fname}: {size} bytes, the manifest says {manifest['files'][fname]['bytes']}")
        with open(shard, "rb") as f:
            for name, info in header.items():
                found[name], dtypes[name] = fname, info["dtype"]
                start, end = (data_start + o for o in info["data_offsets"])
                if not checkable:
                    continue
                expected = manifest["tensors"].get(name, {}).get(algorithm)
                if expected is None:
                    problems.append(f"{name} ({fname}): no {algorithm} digest in {MANIFEST}")
                elif tensor_digest(f, start, end, algorithm) != expected:
                    problems.append(f"{name} ({fname}): checksum mismatch, the bytes changed after export")
    for name in sorted(set(weight_map) - set(found)):
        if weight_map[name] in found.values():
            problems.append(f"{name}: in the index but not in {weight_map[name]}")
    for name in sorted(set(found) - set(weight_map)):
        problems.append(f"{name}: in {found[name]} but not in the index")
    if manifest:
        for name in sorted(set(manifest["tensors"]) - set(weight_map)):
            problems.append(f"{name}: in the manifest but not in the index")

    static = static_input_scales(config)
    quantized = 0
    handles: dict[str, object] = {}

    def load(name: str) -> torch.Tensor:
        fname = weight_map[name]
        if fname not in handles:
            handles[fname] = safe_open(str(path / fname), "pt")
        return handles[fname].get_tensor(name)

    for name in sorted(n for n in weight_map if n in found):
        if name.endswith(SCALE_SUFFIXES):
            issue = check_scale(name, load(name))
            if issue:
                problems.append(issue)
        module, is_packed = None, name.endswith(".weight_packed")
        if is_packed:
            module = name[: -len(".weight_packed")]
        elif name.endswith(".weight") and name + "_scale" in weight_map:
            module = name[: -len(".weight")]
        elif name.endswith(".weight") and dtypes[name].startswith("F8"):
            problems.append(f"{name}: FP8 weight without {name}_scale")
            continue
        if module is None:
            continue
        quantized += 1
        if module + ".weight_scale" not in weight_map:
            problems.append(f"{module}: quantized weight without weight_scale")
        if static and module + ".input_scale" not in weight_map:
            problems.append(f"{module}: static activations promised by quantization_config, but no input_scale")
    summary = {"tensors": len(found), "shards": len(set(weight_map.values())), "quantized_modules": quantized,
               "checksums": checkable}
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--no-checksums", action="store_true", help="skip reading every tensor's bytes")
    args = parser.parse_args(argv)
    try:
        problems, summary = verify(args.checkpoint, checksums=not args.no_checksums)
    except SlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAIL {p}")
    verdict = "ok" if not problems else f"{len(problems)} problem(s)"
    print(f"{verdict}: {summary['tensors']} tensors in {summary['shards']} shard(s), "
          f"{summary['quantized_modules']} quantized modules, checksums "
          f"{'verified' if summary['checksums'] else 'not checked'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
