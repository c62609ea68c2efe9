"""slim.compare on synthetic sweep trees, and the sweep / eval configs that feed it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slim.compare import compare, find_jobs, layer_sqnr, main, module_kind
from slim.errors import SlimError
from tests.helpers.configs import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf"

# two jobs of a group_size sweep: (group_size, ignore_layers, observer, checkpoint bytes, baseline, quantized metrics)
JOBS = [
    (64, ["lm_head", "self_attn"], "minmax", 17_301_504,
     {"ppl": {"word_perplexity": 1000.0}, "mc": {"acc": 0.40}}, {"ppl": {"word_perplexity": 1040.0}, "mc": {"acc": 0.37}}),
    (128, ["lm_head"], "mse", 16_777_216,
     {"ppl": {"word_perplexity": 1000.0}, "mc": {"acc": 0.40}}, {"ppl": {"word_perplexity": 1012.5}, "mc": {"acc": 0.41}}),
]


def _modules(offset: float) -> list[dict]:
    """Two decoder layers: attention (layer 0 only), a dense MLP (layer 0), routed experts and a shared expert."""
    rows = []

    def add(name, sqnr):
        rows.append({"name": name, "in_features": 256, "out_features": 256, "tokens": 64, "input_amax": 4.0,
                     "input_scale": 4.0 / 448, "weight_scale_max": 0.01, "weight_scale_min": 0.001,
                     "sqnr_db": sqnr, "fallback": False})

    add("model.layers.0.self_attn.q_a_proj", 30.0 + offset)
    add("model.layers.0.self_attn.o_proj", 32.0 + offset)
    add("model.layers.0.mlp.down_proj", 20.0 + offset)
    for e, s in enumerate((18.0, 19.0, 23.0)):
        add(f"model.layers.1.mlp.experts.{e}.gate_proj", s + offset)
    add("model.layers.1.mlp.shared_experts.up_proj", 21.0 + offset)
    add("lm_head", 40.0)
    return rows


def make_sweep(root: Path) -> Path:
    for i, (g, ignore, obs, nbytes, base, quant) in enumerate(JOBS):
        job = root / f"{i}_scheme.group_size={g}"
        (job / ".hydra").mkdir(parents=True)
        delta = {t: {m: quant[t][m] - v for m, v in ms.items()} for t, ms in base.items()}
        results = {"mode": "quantize", "model": "tiny_deepseek", "scheme": "w4a8", "checkpoint_bytes": nbytes,
                   "metrics": {"baseline": base, "quantized": quant}, "delta": delta,
                   "quantization": {"ignored": ["lm_head"], "fallbacks": []}, "timings_s": {"quantize": 1.0}}
        (job / "results.json").write_text(json.dumps(results))
        (job / "modules.json").write_text(json.dumps(_modules(offset=float(i))))
        config = {"scheme": {"name": "w4a8", "group_size": g, "ignore_layers": ignore, "weight_observer": obs,
                             "low_memory": "${hardware.low_memory}"}}
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["scheme=w4a8", f"scheme.group_size={g}"]))
    return root


def test_module_kinds():
    assert module_kind("model.layers.3.self_attn.kv_b_proj") == "attention"
    assert module_kind("model.layers.0.mlp.gate_proj") == "dense mlp"
    assert module_kind("model.layers.3.mlp.shared_experts.down_proj") == "shared expert"
    assert module_kind("model.layers.3.mlp.experts.17.up_proj") == "routed experts"
    assert module_kind("lm_head") == "lm_head"


def test_layer_sqnr_averages_experts_per_layer():
    stats = layer_sqnr(_modules(0.0))
    assert list(stats) == ["attention", "dense mlp", "shared expert", "routed experts"]  # lm_head has no layer
    assert stats["attention"][0]["mean"] == pytest.approx(31.0)
    assert stats["routed experts"][1] == {"mean": pytest.approx(20.0), "min": 18.0, "max": 23.0, "count": 3}
    assert 1 not in stats["attention"]


def test_table_numbers_match_the_inputs(tmp_path, capsys):
    root = make_sweep(tmp_path / "sweep")
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert printed.split("\nwrote:")[0].strip() in table
    lines = [ln for ln in table.splitlines() if ln.startswith("| #")]
    assert len(lines) == len(JOBS)
    header = next(ln for ln in table.splitlines() if ln.startswith("| job"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:7] == ["job", "scheme", "group_size", "ignore_layers", "observer", "checkpoint MiB", "quantized modules"]
    assert cols[7:] == ["mc acc", "ppl word_perplexity"]
    for line, (g, ignore, obs, nbytes, base, quant) in zip(lines, JOBS):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:5] == ["w4a8", str(g), "[" + ", ".join(ignore) + "]", obs]
        assert float(cells[5]) == pytest.approx(nbytes / 2**20, abs=0.005)
        assert cells[6] == str(len(_modules(0.0)))
        for cell, (task, metric) in zip(cells[7:], [("mc", "acc"), ("ppl", "word_perplexity")]):
            value, delta = cell.split(" ")
            assert float(value) == pytest.approx(quant[task][metric], rel=1e-3)
            rel = 100 * (quant[task][metric] - base[task][metric]) / base[task][metric]
            assert delta == f"({rel:+.2f}%)"
    baseline = next(ln for ln in table.splitlines() if ln.startswith("| bf16 baseline"))
    assert [float(c) for c in baseline.strip("|").split("|")[7:]] == [0.40, 1000.0]

    summary = json.loads((out / "compare.json").read_text())
    assert [j["group_size"] for j in summary["jobs"]] == [64, 128]
    j1 = summary["jobs"][1]
    assert j1["metrics"]["ppl"]["word_perplexity"]["delta_pct"] == pytest.approx(1.25)
    assert j1["layer_sqnr"]["routed experts"]["1"]["mean"] == pytest.approx(21.0)  # +1 dB offset for job 1
    assert summary["notes"] == []  # same baseline in both jobs


def _ink(png: Path) -> float:
    """Fraction of pixels that are not background white."""
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    return float((img.min(axis=-1) < 0.9).mean())


def test_plots_are_written_and_drawn(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    summary = compare(root)
    plots = {Path(p).name: Path(p) for p in summary["plots"]}
    assert set(plots) == {"metrics_vs_size.png", "sqnr_per_layer.png"}
    from matplotlib.image import imread

    for path in plots.values():
        h, w = imread(path).shape[:2]
        assert h >= 400 and w >= 800
        assert 0.01 < _ink(path) < 0.5  # axes, points and lines, not blank and not a solid block
    md = (root / "compare.md").read_text()
    assert "![metrics_vs_size](metrics_vs_size.png)" in md


def test_plots_differ_with_the_data(tmp_path):
    a = make_sweep(tmp_path / "a")
    b = make_sweep(tmp_path / "b")
    job = b / "1_scheme.group_size=128" / "modules.json"
    rows = json.loads(job.read_text())
    for r in rows:
        r["sqnr_db"] -= 10.0
    job.write_text(json.dumps(rows))
    compare(a)
    compare(b)
    assert (a / "sqnr_per_layer.png").read_bytes() != (b / "sqnr_per_layer.png").read_bytes()
    assert (a / "metrics_vs_size.png").read_bytes() == (b / "metrics_vs_size.png").read_bytes()


def test_no_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "0_job" / ".hydra").mkdir(parents=True)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results.json under") and "Traceback" not in err
    with pytest.raises(SlimError, match="not a directory"):
        find_jobs(tmp_path / "missing")


def test_unfinished_jobs_and_differing_baselines_are_noted(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    (root / "2_scheme.group_size=32" / ".hydra").mkdir(parents=True)  # a job that died before results.json
    res = root / "1_scheme.group_size=128" / "results.json"
    results = json.loads(res.read_text())
    results["metrics"]["baseline"]["mc"]["acc"] = 0.5
    res.write_text(json.dumps(results))
    summary = compare(root)
    assert any("2_scheme.group_size=32" in n for n in summary["notes"])
    assert any(n.startswith("mc acc: baseline ranges 0.4..0.5") for n in summary["notes"])
    assert len(summary["jobs"]) == 2


# ---- the configs a sweep is made of ----

def sweep_jobs(experiment: str) -> list[list[str]]:
    """The per-job overrides `python -m slim.main -m +experiment=<experiment>` launches (Hydra's basic sweeper)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from slim.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_group_size_sweep_composes_to_its_grid():
    from slim.config import validate

    jobs = sweep_jobs("sweep_group_size")
    assert jobs == [["scheme.group_size=32"], ["scheme.group_size=64"], ["scheme.group_size=128"]]
    cfgs = [validate(compose_config("+experiment=sweep_group_size", *job)) for job in jobs]
    assert [c.scheme.group_size for c in cfgs] == [32, 64, 128]
    assert {c.scheme.name for c in cfgs} == {"w4a8"}
    default = compose_config("scheme=w4a8").scheme.ignore_layers
    assert all(c.scheme.ignore_layers == default for c in cfgs)


def test_ignore_layers_sweep_goes_from_reference_to_all_but_lm_head(embedded_model_path):
    from slim.config import validate
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.loading import DTYPES
    from slim.targets import select_targets

    jobs = sweep_jobs("sweep_ignore_layers")
    cfgs = [validate(compose_config("+experiment=sweep_ignore_layers", *job)) for job in jobs]
    assert len(cfgs) == 4 and {(c.scheme.name, c.scheme.group_size) for c in cfgs} == {("w4a8", 128)}
    model, _ = build_skeleton(load_config(str(embedded_model_path), False), DTYPES["bfloat16"])
    kinds = []
    for c in cfgs:
        targets = select_targets(model, c.scheme.ignore_layers).targets
        kinds.append({module_kind(n) for n in targets})
    reference = select_targets(model, compose_config("scheme=w4a8").scheme.ignore_layers).targets
    assert set(select_targets(model, cfgs[0].scheme.ignore_layers).targets) == set(reference)
    assert kinds == [
        {"routed experts"},
        {"routed experts", "shared expert"},
        {"routed experts", "shared expert", "dense mlp"},
        {"routed experts", "shared expert", "dense mlp", "attention"},
    ]


def test_standard_eval_composes_with_settable_limits():
    from slim.config import validate

    cfg = validate(compose_config("eval=standard", "eval.limit=100", "eval.num_fewshot=5", "eval.batch_size=16"))
    assert cfg.eval.tasks == ["gsm8k", "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "mmlu"]
    assert (cfg.eval.limit, cfg.eval.num_fewshot, cfg.eval.batch_size, cfg.eval.baseline) == (100, 5, 16, True)
    default = compose_config("eval=standard").eval
    assert default.limit is None and default.num_fewshot is None
