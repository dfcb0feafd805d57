"""`dlm.settings.loading`: YAML files with `base:` inheritance, `key=value` overrides merged onto a settings
dataclass (a real instance, its `__post_init__` run, errors in one line), and the YAML / dotted-key views."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal

import pytest
from omegaconf import MISSING, DictConfig, OmegaConf

from dlm.settings import ConfigError, check, flatten, to_yaml
from dlm.settings.loading import check_overrides, merge, yaml_layers


@dataclass
class Part:
    kind: Literal["a", "b"] = "a"
    size: int = 2
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class Whole:
    name: str = "w"
    part: Part = field(default_factory=Part)
    sizes: List[int] = field(default_factory=lambda: [1, 2])
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check(self.part.size <= 10, "part.size", self.part.size, "must be <= 10")


@dataclass
class Named:
    name: str = MISSING


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- yaml_layers -----------------------------------------------------------------------------------
def test_yaml_layers_of_a_file_without_base_is_the_file(tmp_path):
    layers = yaml_layers(write(tmp_path / "a.yaml", "ratio: 0.25\n"))
    assert len(layers) == 1 and isinstance(layers[0], DictConfig)
    assert OmegaConf.to_container(layers[0]) == {"ratio": 0.25}


def test_yaml_layers_put_the_parents_first_and_drop_the_base_key(tmp_path):
    write(tmp_path / "grand.yaml", "name: grand\nratio: 0.1\n")
    write(tmp_path / "parent.yaml", "base: grand.yaml\nname: parent\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\npart: {size: 3}\n")
    layers = [OmegaConf.to_container(layer) for layer in yaml_layers(child)]
    assert layers == [{"name": "grand", "ratio": 0.1}, {"name": "parent"}, {"part": {"size": 3}}]


def test_yaml_layers_base_is_relative_to_the_file_naming_it(tmp_path):
    write(tmp_path / "shared" / "parent.yaml", "name: parent\n")
    child = write(tmp_path / "runs" / "child.yaml", "base: ../shared/parent.yaml\nratio: 0.75\n")
    assert merge(Whole, yaml_layers(child)) == Whole(name="parent", ratio=0.75)


def test_yaml_layers_missing_file_names_the_label_and_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^sweep={re.escape(repr(str(missing)))}: file not found$"):
        yaml_layers(missing, label="sweep")
    with pytest.raises(ConfigError, match=rf"^config={re.escape(repr(str(missing)))}: file not found$"):
        yaml_layers(missing)


def test_yaml_layers_missing_base_file_fails_with_its_path(tmp_path):
    child = write(tmp_path / "child.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=rf"^config={re.escape(repr(str(tmp_path / 'gone.yaml')))}: file not found$"):
        yaml_layers(child)


def test_yaml_layers_base_cycle_fails_in_one_line_naming_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match=r"^base='a\.yaml': the files name each other as base "
                                          r"\(a\.yaml -> b\.yaml -> a\.yaml\)$"):
        yaml_layers(a)


def test_yaml_layers_a_file_naming_itself_as_base_is_a_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"^base='a\.yaml': the files name each other as base "
                                          r"\(a\.yaml -> a\.yaml\)$"):
        yaml_layers(a)


# -- check_overrides -------------------------------------------------------------------------------
def test_check_overrides_accepts_key_value_pairs():
    check_overrides([])
    check_overrides(["part.size=3", "name=", "tags={a: b}"])


def test_check_overrides_rejects_an_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"^'part\.size': override must be key=value; "
                                          r"e\.g\. attention\.block_size=32$"):
        check_overrides(["name=x", "part.size"])


# -- merge -----------------------------------------------------------------------------------------
def test_merge_without_layers_is_the_default_instance():
    merged = merge(Whole, [])
    assert type(merged) is Whole and type(merged.part) is Part and merged == Whole()


def test_merge_layers_then_overrides_later_wins(tmp_path):
    write(tmp_path / "parent.yaml", "name: parent\npart: {kind: b, size: 4}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\npart: {size: 5}\n")
    merged = merge(Whole, yaml_layers(child), ["part.size=6", "sizes=[7]"])
    assert merged == Whole(name="parent", part=Part(kind="b", size=6), sizes=[7])


def test_merge_takes_plain_dicts_as_layers():
    merged = merge(Whole, [{"ratio": 0.1}, {"part": {"tags": {"x": "y"}}}])
    assert merged == Whole(ratio=0.1, part=Part(tags={"x": "y"}))


def test_merge_converts_override_strings_to_the_field_types():
    merged = merge(Whole, [], ["ratio=1", "part.size=8"])
    assert merged.ratio == 1.0 and isinstance(merged.ratio, float) and merged.part.size == 8


def test_merge_runs_post_init_of_the_dataclass():
    with pytest.raises(ConfigError, match=r"^(where: )?part\.size=11: must be <= 10$"):
        merge(Whole, [], ["part.size=11"], where="where: ")


@pytest.mark.parametrize("override, match", [
    ("part.sise=3", r"part\.sise: unknown key \(did you mean 'size'\?\); allowed: kind, size, tags"),
    ("part.kind=c", r"part\.kind='c': unknown kind; allowed: a, b"),
    ("part.size=big", r"part\.size='big': Value 'big' of type 'str' could not be converted to Integer"),
])
def test_merge_errors_are_one_line_and_prefixed_by_where(override, match):
    with pytest.raises(ConfigError, match=rf"^file 'x\.yaml': {match}$"):
        merge(Whole, [], [override], where="file 'x.yaml': ")
    with pytest.raises(ConfigError, match=rf"^{match}$"):
        merge(Whole, [], [override])


def test_merge_error_from_a_layer_is_one_line(tmp_path):
    layer = write(tmp_path / "bad.yaml", "part:\n  kind: c\n")
    with pytest.raises(ConfigError, match=r"^part\.kind='c': unknown kind; allowed: a, b$"):
        merge(Whole, yaml_layers(layer))


def test_merge_checks_the_overrides_first():
    with pytest.raises(ConfigError, match=r"'ratio': override must be key=value"):
        merge(Whole, [], ["ratio"])


def test_merge_fills_a_mandatory_field_from_the_overrides():
    assert merge(Named, [], ["name=n"]) == Named(name="n")


def test_merge_missing_mandatory_field_is_required():
    with pytest.raises(ConfigError, match=r"^name: required$"):
        merge(Named, [])


# -- to_yaml, flatten ------------------------------------------------------------------------------
def test_to_yaml_merged_back_onto_the_schema_gives_an_equal_object():
    obj = Whole(name="n", part=Part(kind="b", size=9, tags={"k": "v"}), sizes=[3, 4], ratio=0.125)
    text = to_yaml(obj)
    assert "kind: b" in text and "ratio: 0.125" in text
    assert merge(Whole, [OmegaConf.create(text)]) == obj


def test_to_yaml_round_trips_through_a_file(tmp_path):
    obj = Whole(part=Part(size=7))
    assert merge(Whole, yaml_layers(write(tmp_path / "saved.yaml", to_yaml(obj)))) == obj


def test_flatten_gives_dotted_keys_of_every_leaf():
    flat = flatten(Whole(part=Part(kind="b", tags={"k": "v"})))
    assert flat == {"name": "w", "part.kind": "b", "part.size": 2, "part.tags.k": "v", "sizes": [1, 2], "ratio": 0.5}


def test_flatten_keeps_an_empty_mapping_as_a_value():
    assert flatten(Whole())["part.tags"] == {}


@pytest.mark.parametrize("text, match", [
    ("a: 1\nb: [1, 2\n", r"invalid YAML at line 3, column 1 \(did not find expected ',' or '\]'\)"),
    ("a: !!python/name:os.system\n", r"invalid YAML at line 1, column 4 \(could not determine a constructor"),
    ("- a\n- b\n", r"top level is a list, not a mapping of keys"),
])
def test_yaml_errors_name_the_file_and_line(tmp_path, text, match):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config='{re.escape(str(path))}': {match}"):
        yaml_layers(path)
