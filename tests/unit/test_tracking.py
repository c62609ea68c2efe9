"""W&B tracking offline: the per-module table and scale histograms, sweep groups, finish on errors."""

from __future__ import annotations

import json
import math
import time

import pytest

from slim.config import LoggerConfig
from slim.tracking import Tracker, read_offline_run, sweep_group


def _rows():
    rows = []
    for i, name in enumerate(["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.shared_experts.up_proj",
                              "model.layers.1.mlp.experts.0.up_proj", "model.layers.1.mlp.experts.1.up_proj"]):
        rows.append({"name": name, "in_features": 64, "out_features": 64, "tokens": 10 * i,
                     "input_amax": 2.0 ** i, "input_scale": 2.0 ** i / 448,
                     "weight_scale_max": 10.0 ** -(i + 1), "weight_scale_min": 10.0 ** -(i + 2),
                     "sqnr_db": 20.0 + i, "fallback": i == 3})
    rows[1]["input_scale"] = None  # e.g. a dynamic-activation module has no static input scale
    return rows


def _records(run_dir, timeout_s: float = 30.0):
    """The run's records once its exit record is on disk: W&B's service writes the file a moment after finish()."""
    (run,) = list((run_dir / "wandb").glob("offline-run-*"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_offline_run(run))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _items(records, kind: str) -> dict:
    """History or summary items of a run, nested again (W&B flattens ``{"a": {"b": 1}}`` to key path a, b)."""
    out: dict = {}
    for r in records:
        if r.WhichOneof("record_type") != kind:
            continue
        for item in (r.history.item if kind == "history" else r.summary.update):
            path = [item.key] if item.key else list(item.nested_key)
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
    return out


def _history(records) -> dict:
    return _items(records, "history")


def _summary(records) -> dict:
    return _items(records, "summary")


def test_modules_logs_table_histograms_and_kind_means(tmp_path):
    rows = _rows()
    tracker = Tracker(LoggerConfig(name="wandb", mode="offline", group="g1"), tmp_path, {"logger": {"group": None}},
                      name="tiny-w4a8")
    try:
        tracker.modules(rows)
    finally:
        tracker.finish()
    records = _records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "g1" and run.display_name == "tiny-w4a8"  # explicit logger.group wins
    history = _history(records)
    assert history["modules"]["_type"] == "table-file" and history["modules"]["nrows"] == len(rows)
    hist = history["modules/log10_input_scale"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 3  # the None scale is left out
    lo, hi = hist["bins"][0], hist["bins"][-1]
    assert lo == pytest.approx(math.log10(1 / 448)) and hi == pytest.approx(math.log10(8 / 448))
    assert sum(history["modules/log10_weight_scale_max"]["values"]) == 4
    assert history["modules/log10_weight_scale_min"]["bins"][0] == pytest.approx(-5)
    summary = _summary(records)
    assert summary["modules/sqnr_db_mean/routed experts"] == pytest.approx(22.5)
    assert summary["modules/sqnr_db_mean/attention"] == pytest.approx(20.0)
    assert summary["modules/count"] == 4 and summary["modules/fallbacks"] == 1


def test_table_name_still_works_and_failed_run_records_exit_code(tmp_path):
    tracker = Tracker(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, name="run")
    try:
        tracker.table("modules", _rows())
        raise RuntimeError("stage failed")
    except RuntimeError:
        tracker.finish(exit_code=1)
    assert tracker.run is None
    records = _records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == ""  # a single run has no group
    assert "modules" in _history(records)
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1


def test_disabled_logger_is_a_no_op(tmp_path):
    tracker = Tracker(LoggerConfig(name="none", mode="disabled"), tmp_path, {}, name="run")
    tracker.modules(_rows())
    tracker.finish()
    assert not (tmp_path / "wandb").exists()


def test_sweep_group_outside_a_multirun():
    assert sweep_group(None) is None  # no Hydra app running: a single run keeps no group
    assert sweep_group("mine") == "mine"


def test_offline_reader_crosses_log_blocks(tmp_path):
    """Records that span the 32 KiB blocks of the run file come back whole and in order."""
    tracker = Tracker(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, name="run")
    try:
        for step in range(300):
            tracker.log({"step_value": step, "note": f"{step:04d}" * 100})
    finally:
        tracker.finish()
    records = _records(tmp_path)
    (run_file,) = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert run_file.stat().st_size > 3 * 32768
    nums = [r.num for r in records if r.num]
    assert nums == list(range(1, len(nums) + 1))  # none lost, none out of order
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    rows = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in h.item} for h in history]
    assert [row["step_value"] for row in rows] == list(range(300))
    assert [row["note"] for row in rows] == [f"{s:04d}" * 100 for s in range(300)]


def test_offline_reader_skips_block_trailers(tmp_path):
    """LevelDB log layout: a block with fewer than 7 bytes left is zero-padded; records split FIRST/MIDDLE/LAST."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    block = 32768

    def record(num: int, size: int) -> bytes:
        return pb.Record(num=num, uuid="u" * size).SerializeToString()

    def put(out: bytearray, kind: int, payload: bytes) -> None:
        out += struct.pack("<IHB", 0, len(payload), kind) + payload

    out = bytearray(b":W&B\xe1\xbe\x00")
    put(out, 1, record(1, 10))
    room = block - len(out) - 7 - 3  # a FULL record of this size leaves 3 bytes in block 0
    filler = next(r for n in range(room, room - 10, -1) if len(r := record(3, n)) == room)
    put(out, 1, filler)
    assert block - len(out) == 3
    out += b"\x00" * 3
    rest, kinds = record(2, 70000), []  # spans three blocks
    while rest:
        take = block - len(out) % block - 7
        kinds.append(1 if not kinds and len(rest) <= take else 2 if not kinds else 4 if len(rest) <= take else 3)
        put(out, kinds[-1], rest[:take])
        rest = rest[take:]
    assert kinds == [2, 3, 4]
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(out))
    records = list(read_offline_run(path))
    assert [r.num for r in records] == [1, 3, 2]
    assert records[2].uuid == "u" * 70000
