"""Convert a DeepSeek block-FP8 checkpoint to bf16 (what ``model.load_type=bf16`` reads).

    python -m slim.models.convert <fp8 checkpoint dir> <output dir>

Streams tensor by tensor (memory = one shard of output), drops ``quantization_config`` from config.json and
copies the tokenizer. The output is written to ``<output dir>.partial`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slim.config import ModelConfig
from slim.errors import SlimError
from slim.export import CheckpointWriter
from slim.models.checkpoint import CheckpointReader

log = logging.getLogger(__name__)


def convert_fp8_to_bf16(src: str | Path, dst: str | Path, max_shard_bytes: int = 4 << 30) -> Path:
    src, dst = Path(src), Path(dst)
    reader = CheckpointReader(src, load_type="fp8")
    reader.check_load_type()
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = CheckpointWriter(partial, max_shard_bytes)
    for name in tqdm(reader.names(), desc="fp8 -> bf16", unit="tensor", leave=False):
        if reader.is_aux(name):
            continue
        writer.add(name, reader.passthrough(name, torch.bfloat16))
        writer.maybe_flush()
    config = reader.config()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    writer.finalize(config, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dst)
    log.info("converted %s -> %s (bf16)", src, dst)
    return dst


def source_dir(model: ModelConfig) -> Path:
    """The checkpoint the run's bytes come from, before any conversion: ``model.path``, or ``model.convert_from``
    while ``model.path`` has no config.json yet (it is converted once, by :func:`prepare_source`)."""
    path = Path(model.path)
    if not (path / "config.json").is_file() and model.convert_from:
        return Path(model.convert_from)
    return path


def prepare_source(model: ModelConfig) -> Path:
    """The checkpoint to read; converts ``model.convert_from`` (FP8) into ``model.path`` (bf16) once if needed."""
    path = Path(model.path)
    if not path.exists() and model.convert_from:
        log.info("converting %s to bf16 into %s (once)", model.convert_from, path)
        convert_fp8_to_bf16(model.convert_from, path)
    if not (path / "config.json").is_file():
        raise SlimError(f"model.path={path} is not a checkpoint directory (no config.json); set model.path")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_fp8_to_bf16(args.src, args.dst)


if __name__ == "__main__":
    main()
