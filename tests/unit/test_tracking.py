"""W&B tracking offline: the per-module table and scale histograms, sweep groups, run ids and names, per-module data
past W&B's table row limit, score deltas. A failed job's exit code, through the CLI: tests/cli/test_tracking_cli.py."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from slim.config import LoggerConfig
from slim.tracking import Tracker, _table_parts, read_offline_run, run_id, run_name, scores, sweep_group


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
    """The run's records once its exit record is on disk: W&B's service writes the file a moment after finish().
    ``run_dir``: a directory holding ``wandb/`` with one offline run, or an ``offline-run-*`` directory itself."""
    if run_dir.name.startswith("offline-run-"):
        run = run_dir
    else:
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


def test_table_logs_rows_and_a_single_run_has_no_group(tmp_path):
    """(A failed job's exit code is tested through the pipeline: tests/cli/test_tracking_cli.py.)"""
    tracker = Tracker(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, name="run")
    try:
        tracker.table("sensitivity/ranking", _rows())
    finally:
        tracker.finish()
    assert tracker.run is None
    records = _records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == ""  # a single run has no group
    assert _history(records)["sensitivity/ranking"]["nrows"] == len(_rows())


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


def test_run_id_is_one_per_run_dir_and_job(tmp_path):
    (tmp_path / "a").mkdir()
    same = run_id(tmp_path / "a", "quantize")
    assert run_id(tmp_path / "a" / ".." / "a", "quantize") == same  # the resolved path
    assert run_id(tmp_path / "b", "quantize") != same and run_id(tmp_path / "a", "sensitivity") != same
    assert len(same) == 16 and set(same) <= set("0123456789abcdef")


def test_run_name_says_model_scheme_algorithm_and_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = run_name("tiny_deepseek", "w4a8", "gptq", tmp_path / "outputs" / "d" / "t")
    assert name == "tiny_deepseek-w4a8-gptq outputs/d/t"
    outside = tmp_path.parent / "elsewhere" / "x" / "y"
    assert run_name("m", "fp8_static", "rtn", outside, mode="eval") == "m-fp8_static-rtn-eval x/y"


def test_same_run_id_twice_gives_one_run_id_on_disk(tmp_path):
    """A rerun in the same run directory opens the same W&B run (resume="allow"): offline, one id on both attempts."""
    rid = run_id(tmp_path, "quantize")
    for attempt in range(2):
        tracker = Tracker(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, name="n", run_id=rid)
        tracker.log({"attempt": attempt})
        tracker.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {r.run.run_id for run in runs for r in _records(run) if r.WhichOneof("record_type") == "run"}
    assert ids == {rid}


def _many_rows(layers: int, per_layer: int) -> list[dict]:
    rows = [{"name": f"model.layers.{i}.mlp.experts.{e}.{p}", "sqnr_db": 20.0 + (e % 7), "input_scale": 1e-3 * (1 + e),
             "fallback": e == 5} for i in range(layers) for e in range(per_layer // 3) for p in ("gate_proj", "up_proj",
                                                                                                 "down_proj")]
    return rows + [{"name": "lm_head", "sqnr_db": 10.0, "input_scale": 0.5, "fallback": False}]


def test_more_modules_than_a_wandb_table_holds_are_all_kept(tmp_path, monkeypatch):
    """R1 has ~45k quantized Linears; W&B cuts a table at 10,000 rows. Past that the rows go to one table per decoder
    layer, and modules.json goes whole into a ``modules`` artifact: nothing is cut (read back from the offline run)."""
    import wandb

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging stays in the test's dir
    rows = _many_rows(layers=14, per_layer=774)  # 14 x 774 + lm_head = 10,837 rows
    assert len(rows) > wandb.Table.MAX_ROWS
    file = tmp_path / "modules.json"
    file.write_text(json.dumps(rows))
    tracker = Tracker(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, name="r1", run_id=run_id(tmp_path, "q"))
    try:
        tracker.modules(rows, file=file)
    finally:
        tracker.finish()
    records = _records(tmp_path)
    history = _history(records)
    tables = {k: v for k, v in history.items() if isinstance(v, dict) and v.get("_type") == "table-file"}
    assert set(tables) == {f"modules/layers.{i}" for i in range(14)} | {"modules/other"}
    (files,) = list((tmp_path / "wandb").glob("offline-run-*/files"))
    names = []
    for meta in tables.values():
        data = json.loads((files / meta["path"]).read_text())
        names += [row[data["columns"].index("name")] for row in data["data"]]
    assert sorted(names) == sorted(r["name"] for r in rows)  # every row, in the tables W&B keeps whole
    (artifact,) = [r.artifact for r in records
                   if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "modules"]
    (entry,) = artifact.manifest.contents
    assert entry.path == "modules.json" and entry.size == file.stat().st_size
    assert json.loads(Path(entry.local_path).read_text()) == rows
    summary = _summary(records)
    assert summary["modules/count"] == len(rows) and summary["modules/fallbacks"] == 14 * 3
    assert summary["modules/sqnr_db_min/all"] == 10.0 and summary["modules/worst_module"] == "lm_head"
    assert summary["modules/sqnr_db_mean/routed experts"] == pytest.approx(
        sum(r["sqnr_db"] for r in rows[:-1]) / (len(rows) - 1))


def test_a_layer_past_the_limit_is_split_in_pieces():
    rows = _many_rows(layers=2, per_layer=30)
    parts = _table_parts(rows, "modules", limit=25)
    assert {k: len(v) for k, v in parts.items()} == {"modules/layers.0.0": 25, "modules/layers.0.1": 5,
                                                      "modules/layers.1.0": 25, "modules/layers.1.1": 5,
                                                      "modules/other": 1}
    assert _table_parts(rows, "modules", limit=len(rows)) == {"modules": rows}


def test_scores_carry_deltas_against_the_baseline():
    metrics = {"baseline": {"t": {"ppl": 10.0, "acc": 0.5}}, "quantized": {"t": {"ppl": 10.5, "acc": 0.5}}}
    out = scores(metrics)
    assert out["baseline/t/ppl"] == 10.0 and out["quantized/t/acc"] == 0.5
    assert out["delta/t/ppl"] == pytest.approx(0.5) and out["delta/t/acc"] == 0.0
    assert out["delta_pct/t/ppl"] == pytest.approx(5.0)
    assert not any(k.startswith("delta") for k in scores({"model": metrics["baseline"]}))
