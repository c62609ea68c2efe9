import pytest

from slim.errors import SlimError
from slim.targets import matches, resolve_ignored

NAMES = [
    "model.layers.0.self_attn.q_a_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.1.mlp.experts.0.gate_proj",
    "model.layers.1.mlp.shared_experts.down_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("lm_head", {"lm_head"}),
        ("self_attn", {"model.layers.0.self_attn.q_a_proj"}),
        ("shared_experts", {"model.layers.1.mlp.shared_experts.down_proj"}),
        ("mlp.gate_proj", {"model.layers.0.mlp.gate_proj"}),
        ("experts.*.gate_proj", {"model.layers.1.mlp.experts.0.gate_proj"}),
        (r"re:model\.layers\.\d+\.mlp\.gate_proj$", {"model.layers.0.mlp.gate_proj"}),
    ],
)
def test_pattern_forms(pattern, expected):
    assert {n for n in NAMES if matches(pattern, n)} == expected


def test_component_match_is_not_substring():
    assert not matches("head", "lm_head")
    assert not matches("gate", "model.layers.0.mlp.gate_proj")


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(SlimError, match="lm_haed"):
        resolve_ignored(["lm_head", "lm_haed"], NAMES)


def test_resolve_reports_matches():
    ignored, matched = resolve_ignored(["lm_head", "self_attn"], NAMES)
    assert ignored == {"lm_head", "model.layers.0.self_attn.q_a_proj"}
    assert matched["self_attn"] == ["model.layers.0.self_attn.q_a_proj"]
