"""The benchmark's GGUF reader and real-model conversion helpers against ggml's block definitions
(ggml/src/ggml-common.h and gguf-py's gguf/quants.py in ggml-org/llama.cpp) and a GGUF file written here."""

import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name):
    sys.path.insert(0, str(REPO / "experiments" / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gguf = load("gguf_reader")


def q4_block(d, m, q, with_min):
    """One block of 32 4-bit values q (0..15), as ggml lays it out: low nibbles hold q[0:16], high q[16:32]."""
    nibbles = (np.array(q[:16], np.uint8) | (np.array(q[16:], np.uint8) << 4)).tobytes()
    return np.float16(d).tobytes() + (np.float16(m).tobytes() if with_min else b"") + nibbles


def test_q4_and_q8_blocks_by_definition():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, 64)
    raw = np.frombuffer(q4_block(0.5, -1.25, q[:32], True) + q4_block(0.25, 2.0, q[32:], True), np.uint8)
    want = np.concatenate([0.5 * q[:32] - 1.25, 0.25 * q[32:] + 2.0]).astype(np.float32)
    assert np.array_equal(gguf.dequantize("Q4_1", raw, 64), want)
    raw0 = np.frombuffer(q4_block(0.5, 0, q[:32], False), np.uint8)
    assert np.array_equal(gguf.dequantize("Q4_0", raw0, 32), (0.5 * (q[:32] - 8)).astype(np.float32))
    q8 = rng.integers(-128, 128, 32).astype(np.int8)
    raw8 = np.frombuffer(np.float16(0.125).tobytes() + q8.tobytes(), np.uint8)
    assert np.array_equal(gguf.dequantize("Q8_0", raw8, 32), (0.125 * q8).astype(np.float32))


def _str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_reads_a_gguf_file(tmp_path):
    """Header, metadata (string, u32, f32, string array), tensor infos, 32-byte aligned data."""
    w = np.arange(64, dtype=np.float32).reshape(2, 32) / 7  # row-major [2, 32]: GGUF dims [32, 2]
    q8 = np.arange(-16, 16, dtype=np.int8)
    blob = {"w": w.tobytes(), "e": np.float16(0.5).tobytes() + q8.tobytes()}
    kv = (_str("general.architecture") + struct.pack("<I", 8) + _str("llama")
          + _str("llama.block_count") + struct.pack("<II", 4, 30)
          + _str("llama.rope.freq_base") + struct.pack("<If", 6, 100000.0)
          + _str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _str("a") + _str("b"))
    infos, offset, data = b"", 0, b""
    for name, dims, type_id in (("w", (32, 2), 0), ("e", (32,), 8)):
        infos += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", type_id, offset)
        data += blob[name] + b"\0" * (-len(blob[name]) % 32)
        offset = len(data)
    head = b"GGUF" + struct.pack("<IQQ", 3, 2, 4) + kv + infos
    (tmp_path / "m.gguf").write_bytes(head + b"\0" * (-len(head) % 32) + data)
    f = gguf.GGUFFile(tmp_path / "m.gguf")
    assert f.fields == {"general.architecture": "llama", "llama.block_count": 30, "llama.rope.freq_base": 100000.0,
                        "tokenizer.ggml.tokens": ["a", "b"]}
    assert np.array_equal(f.tensor("w"), w) and f.type_name("e") == "Q8_0"
    assert np.array_equal(f.tensor("e"), (0.5 * q8).astype(np.float32))
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + head[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf.GGUFFile(tmp_path / "bad.gguf")


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_inverts_llama_cpp_rotary_permute(n_head):
    real_model = load("real_model")
    w = np.random.default_rng(1).standard_normal((n_head * 64, 40)).astype(np.float32)
    # convert_hf_to_gguf.py's LlamaModel.permute
    theirs = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(real_model.unpermute(theirs, n_head), w)
