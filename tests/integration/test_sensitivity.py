"""mode=sensitivity on the embedded model, checked against independent measurements through slim's real
quantize -> export -> load path (transformers' own loss on the read-back checkpoint, not slim's loss code)."""

import json
import math
import shlex

import pytest
import torch
from transformers import AutoTokenizer

from slim.calibration.data import calibration_tokens
from slim.models.adapters import build_skeleton, load_config
from slim.models.loading import load_model
from slim.pipeline import quantize_stage
from slim.quant.schemes import SCHEMES
from slim.sensitivity import build_groups, hydra_override, ignore_patterns, sensitivity_stage, text_tokens
from slim.targets import resolve_ignored
from tests.helpers.configs import compose_config

SMALL = ("logger=none", "calibration.num_samples=4", "sensitivity.heldout_max_tokens=2048")
TARGET = 0.003  # below what quantizing every candidate costs on this model, so the search must keep something


def hf_nll(model, chunks):
    """Mean next-token NLL from transformers' own loss (labels shifted inside the model), token-weighted."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks:
            total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1) * ids.shape[0]
            count += (ids.shape[1] - 1) * ids.shape[0]
    return total / count


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_model_path):
    work = tmp_path_factory.mktemp("sensitivity")
    cfg = compose_config("mode=sensitivity", "scheme=w4a8", *SMALL, f"sensitivity.target_delta={TARGET}")
    cfg.run_dir = str(work / "run")
    results = sensitivity_stage(cfg, {})
    report = json.loads((work / "run" / "sensitivity.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(embedded_model_path))
    calib = calibration_tokens(cfg.calibration, tok).split(cfg.calibration.batch_size)
    heldout = text_tokens(embedded_model_path.parent / "data" / "heldout_ppl.jsonl", "text", tok, 256, 2048)
    source = load_model(str(embedded_model_path), load_type="fp8")
    base = {"calib": hf_nll(source, calib), "heldout": hf_nll(source, heldout)}

    def exported(name, ignore_layers):
        """mode=quantize's stage with ``ignore_layers``, read back from the checkpoint it wrote."""
        qcfg = compose_config("scheme=w4a8", *SMALL, "eval=none")
        qcfg.scheme.ignore_layers = list(ignore_layers)
        nbytes = quantize_stage(qcfg, embedded_model_path, work / name, tok)["checkpoint_bytes"]
        return load_model(str(work / name), load_type="fp8"), nbytes

    return dict(cfg=cfg, results=results, report=report, base=base, calib=calib, heldout=heldout, exported=exported)


@pytest.mark.slow
def test_ranking_matches_independent_measurement(run):
    ranking = run["report"]["ranking"]
    assert len(ranking) == 12  # 4 attention, 1 dense MLP, 3 shared + 3 routed expert groups, lm_head
    deltas = [g["delta"] for g in ranking]
    assert deltas == sorted(deltas, reverse=True)
    fixed = [g["pattern"] for g in run["report"]["not_candidates"]]
    measured = {}
    for g in (ranking[0], ranking[-1]):  # quantize this group alone through export, everything else kept
        others = [h["pattern"] for h in ranking if h is not g] + fixed
        model, _ = run["exported"](g["group"].replace(".", "_"), others)
        measured[g["group"]] = hf_nll(model, run["calib"]) - run["base"]["calib"]
        # the sensitivity run's own figure for this group agrees with the exported checkpoint's
        assert abs(measured[g["group"]] - g["delta"]) < 0.1 * abs(ranking[0]["delta"]), (g, measured)
    top, bottom = measured[ranking[0]["group"]], measured[ranking[-1]["group"]]
    assert top > bottom and top > 0, measured


@pytest.mark.slow
def test_chosen_ignore_list_keeps_exported_checkpoint_within_target(run):
    report = run["report"]
    steps, chosen = report["steps"], report["steps"][report["chosen_step"]]
    added = [st for st in steps if st["phase"] == "add"]
    assert len(added) >= 2, steps  # quantizing everything misses the target: the search had to keep groups
    assert all(st["rel_delta"] > TARGET for st in added[:-1]) and added[-1]["rel_delta"] <= TARGET
    ranked = [g["group"] for g in report["ranking"]]
    assert [st["kept"] for st in added] == [ranked[:k] for k in range(len(added))]  # most sensitive first
    dropped = steps[len(added):]  # pruning tries each kept group but the last added, least sensitive first
    assert [sorted(set(added[-1]["kept"]) - set(st["kept"])) for st in dropped] == [[k] for k in added[-1]["kept"][-2::-1]]
    assert chosen["rel_delta"] <= TARGET and set(chosen["kept"]) <= set(added[-1]["kept"])
    assert report["heldout"]["target_met"] and report["ignore_layers"] == chosen["ignore_layers"]
    model, nbytes = run["exported"]("chosen", report["ignore_layers"])
    ppl = math.exp(hf_nll(model, run["heldout"]))
    base_ppl = math.exp(run["base"]["heldout"])
    assert abs(base_ppl / report["heldout"]["baseline"] - 1) < 2e-3, (base_ppl, report["heldout"])
    assert abs(ppl / report["heldout"]["final"] - 1) < 2e-3, (ppl, report["heldout"])
    assert ppl / base_ppl - 1 <= TARGET + 2e-3, (ppl, base_ppl)
    # the paste-ready override parses back, through Hydra, to exactly this list
    assert compose_config(*shlex.split(report["override"])).scheme.ignore_layers == report["ignore_layers"]
    b = report["bytes"]
    assert abs(b["checkpoint"] / nbytes - 1) < 0.005, (b, nbytes)  # the size estimate vs the checkpoint written
    assert b["checkpoint"] == b["quantized_modules"] + b["kept_modules"] + b["other"] < b["unquantized_checkpoint"]
    assert run["results"]["mode"] == "sensitivity" and run["results"]["checkpoint_bytes"] == b["checkpoint"]


def test_groups_map_to_patterns_slim_accepts(embedded_model_path):
    """Leaving every kind but routed experts out gives the reference w4a8 list, collapsed per kind."""
    model, adapter = build_skeleton(load_config(str(embedded_model_path)), torch.bfloat16)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    prefixes = [adapter.layer_prefix(i) for i in range(len(adapter.layers(model)))]
    groups = build_groups(linears, prefixes, ["routed_experts"], SCHEMES["w4a8"], 128)
    assert sorted(n for g in groups for n in g.modules) == sorted(linears)  # each Linear in exactly one group
    for g in groups:
        assert resolve_ignored([g.pattern], linears)[0] == set(g.modules), g
    fixed = [g for g in groups if not g.candidate]
    patterns = ignore_patterns(fixed, groups, linears)
    assert patterns == ["self_attn", r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj$", "shared_experts", "lm_head"]
    reference = compose_config("scheme=w4a8").scheme.ignore_layers
    assert resolve_ignored(patterns, linears)[0] == resolve_ignored(reference, linears)[0]
    assert compose_config(*shlex.split(hydra_override(patterns))).scheme.ignore_layers == patterns
    # a partial kind stays per layer
    attn = [g for g in groups if g.kind == "attention"]
    assert ignore_patterns(attn[:2], groups, linears) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.mark.slow
def test_layer_local_fallback_streams_and_ranks(tmp_path):
    cfg = compose_config("mode=sensitivity", "scheme=w4a8", "logger=none", "calibration.num_samples=2",
                         "sensitivity.method=layer_local", "sensitivity.max_groups=2")
    cfg.run_dir = str(tmp_path)
    results = sensitivity_stage(cfg, {})
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert report["method"] == "layer_local" and report["heldout"] is None and results["metrics"] == {}
    scores = [g["delta"] for g in report["ranking"]]
    assert len(scores) == 12 and scores == sorted(scores, reverse=True) and all(0 < d < 1 for d in scores)
    top = [g["pattern"] for g in report["ranking"][:2]]
    assert sorted(report["ignore_layers"]) == sorted(top)  # every kind is a candidate: only the top 2 are kept
    assert "LAYER-LOCAL" in (tmp_path / "sensitivity.md").read_text()
