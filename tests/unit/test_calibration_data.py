import json

import pytest
import torch

from slim.calibration.data import calibration_tokens, pack
from slim.config import CalibrationConfig
from slim.errors import SlimError


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_pack_concatenates_documents_without_padding():
    ids = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, num_samples=3, seq_len=4)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]


def test_jsonl_source_shuffles_with_seed(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document number {i} " * 3}) for i in range(20)))
    cfg = CalibrationConfig(name="t", source="jsonl", path=str(path), text_field="body", num_samples=4, seq_len=16)
    a, b = calibration_tokens(cfg, CharTokenizer()), calibration_tokens(cfg, CharTokenizer())
    assert a.shape == (4, 16) and torch.equal(a, b)
    cfg.seed = 1
    assert not torch.equal(a, calibration_tokens(cfg, CharTokenizer()))


def test_short_set_warns_with_counts(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "x" * 40}))
    cfg = CalibrationConfig(name="t", source="jsonl", path=str(path), num_samples=8, seq_len=16)
    ids = calibration_tokens(cfg, CharTokenizer())
    assert ids.shape == (2, 16)
    assert "asked for 8 samples" in caplog.text


@pytest.mark.parametrize("content,message", [("", "has no text"), ('{"other": 1}', "no field 'text'"), ("{", "not valid JSON")])
def test_bad_sources(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(SlimError, match=message):
        calibration_tokens(CalibrationConfig(name="t", source="jsonl", path=str(path)), CharTokenizer())


def test_seq_len_beyond_model_maximum(tmp_path):
    with pytest.raises(SlimError, match="max_position_embeddings"):
        calibration_tokens(CalibrationConfig(name="t", source="jsonl", path="x", seq_len=4096), CharTokenizer(), 1024)
