"""The registry: one module per pattern, the settings' names, options, the experiment rules each pattern adds, and
the rule that no module outside the registry compares pattern names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dlm.settings import PATTERNS, ConfigError
from dlm.tensor import patterns
from dlm.tensor.patterns import load_experiment

TINY = "experiments/tiny.yaml"
REGISTRY_DIR = Path(patterns.__file__).parent


def test_every_module_is_one_pattern_of_its_name_and_the_settings_list_them_all():
    assert tuple(patterns.registry()) == PATTERNS
    assert {p.stem for p in REGISTRY_DIR.glob("*.py")} - {"__init__", "base"} == set(PATTERNS)
    for name, cls in patterns.registry().items():
        assert cls.name == name and cls.__module__ == f"dlm.tensor.patterns.{name}"


@pytest.mark.parametrize("name", PATTERNS)
def test_get_gives_the_pattern_at_the_block_size(name):
    pattern = patterns.get(name, block_size=3)
    assert pattern.name == name and pattern.block_size == 3 and pattern.resized(5).block_size == 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="blok"), r"^attention.pattern='blok': unknown pattern; allowed: bidirectional, block, "),
    (dict(name="block", block_size=0), r"^attention.block_size=0: must be a positive integer$"),
    (dict(name="block", clean_context="causal"), r"^attention.clean_context='causal': only block_clean has a clean "
                                                 r"half \(attention.pattern='block'\); allowed: block$"),
    (dict(name="block_clean", clean_context="token"), r"^attention.clean_context='token': unknown clean context"),
    (dict(name="block", options={"window": 2}), r"^attention.options.window=2: not an option of the block pattern; "
                                                r"allowed: none$"),
    (dict(name="block_window", options={"windows": 2}), r"^attention.options.windows=2: not an option of the "
                                                         r"block_window pattern; allowed: window$"),
    (dict(name="block_window", options={"window": 0}), r"^attention.options.window=0: must be an integer >= 1"),
])
def test_bad_pattern_settings_fail_in_one_line(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=match) as info:
        patterns.get(name, **{"block_size": 2} | kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,match", [
    ("attention.pattern=causal attention.block_size_schedule=[[0,2]]", r"the causal pattern has no blocks"),
    ("objective.ar_weight=1", r"^objective.ar_weight=1.0: needs attention.pattern=block_clean with "
                              r"attention.clean_context=causal"),
    ("objective.diffusion_weight=0", r"^objective.diffusion_weight=0.0: must be > 0 when"),
    ("attention.pattern=block attention.clean_context=causal", r"^attention.clean_context='causal': only "
                                                               r"block_clean has a clean half"),
    ("attention.pattern=block_window attention.options.window=-1", r"^attention.options.window=-1: must be an "
                                                                   r"integer >= 1"),
    ("attention.pattern=block_window objective.ar_weight=1", r"^objective.ar_weight=1.0: needs"),
    ("attention.pattern=causal objective.certainty_weight=1", r"^objective.certainty_weight=1.0: the causal "
                                                              r"pattern trains no masked tokens to sharpen"),
])
def test_the_patterns_experiment_rules_fail_at_load_in_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_experiment(TINY, overrides=override.split())
    assert "\n" not in str(info.value)


def test_options_reach_the_pattern_through_the_config():
    cfg = load_experiment(TINY, overrides=["attention.pattern=block_window", "attention.options.window=3"])
    assert patterns.of(cfg.attention) == patterns.get("block_window", block_size=4, options={"window": 3})
    assert patterns.of(cfg.attention, block_size=2).block_size == 2


def _name_comparisons(path: Path) -> list[str]:
    """`==` / `!=` / `in` comparisons with a pattern name as a string constant."""
    def strings(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(strings(e) for e in node.elts))
        return set()

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            if set().union(*(strings(x) for x in [node.left, *node.comparators])) & set(PATTERNS):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_the_registry_compares_pattern_names():
    package = REGISTRY_DIR.parents[1]
    found = [hit for path in sorted(package.rglob("*.py")) if REGISTRY_DIR not in path.parents
             for hit in _name_comparisons(path)]
    assert found == []


def test_the_source_check_finds_a_comparison(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(meta):\n    return meta.pattern == 'causal' or meta.pattern in ('block',)\n")
    assert len(_name_comparisons(probe)) == 2
