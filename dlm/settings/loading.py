"""YAML files and `key=value` overrides merged onto a settings dataclass by omegaconf,
errors in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlm.settings.errors import ConfigError, check, one_line

T = TypeVar("T")


def yaml_layers(path: Path, *, label: str = "config",
                chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file and, first, the parents it names with a top-level `base: other.yaml`
    (relative to it)."""
    if not path.is_file():
        raise ConfigError(f"{label}={str(path)!r}: file not found")
    if path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, path.resolve()))
        raise ConfigError(f"base={path.name!r}: the files name each other as base ({cycle})")
    layer = load_yaml(path, label=label)
    base = layer.pop("base", None)
    check(base is None or isinstance(base, str), "base", base,
          f"must be one file name (in {str(path)!r})")
    parent_chain = (*chain, path.resolve())
    parents = yaml_layers(path.parent / base, label=label, chain=parent_chain) if base else []
    return [*parents, layer]


def yaml_error(err: yaml.YAMLError, path: Path, label: str) -> ConfigError:
    """A YAML parser / constructor error as one line naming the file, line and column."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return ConfigError(f"{label}={str(path)!r}: invalid YAML{where} ({problem})")


def load_yaml(path: Path, *, label: str = "config") -> DictConfig:
    """A YAML file whose top level is a mapping, as omegaconf reads it
    (no `!!python` tags: a safe loader)."""
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise yaml_error(err, path, label) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{label}={str(path)!r}: cannot read "
                          f"({type(err).__name__}: {err})") from None
    if not isinstance(layer, DictConfig):
        kind = "list" if OmegaConf.is_list(layer) else type(layer).__name__
        raise ConfigError(f"{label}={str(path)!r}: top level is a {kind}, not a mapping of keys; "
                          "e.g. `name: tiny`")
    return layer


def read_yaml_mapping(path: Path, *, label: str) -> dict[str, Any]:
    """Plain `yaml.safe_load` of a file that must hold a mapping (a checkpoint's dlm.yaml)."""
    try:
        data = yaml.safe_load(path.read_text())
        data = {} if data is None else data  # an empty file: its keys are missing, said key by key
    except yaml.YAMLError as err:
        raise yaml_error(err, path, label) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{label}={str(path)!r}: cannot read "
                          f"({type(err).__name__}: {err})") from None
    check(isinstance(data, dict), label, str(path),
          f"top level is a {type(data).__name__}, not a mapping of keys")
    return data


def check_overrides(overrides: Sequence[str]) -> None:
    for bad in (o for o in overrides if "=" not in o):
        raise ConfigError(f"{bad!r}: override must be key=value; e.g. attention.block_size=32")


def merge(schema: type[T], layers: Sequence[Any], overrides: Sequence[str] = (), *,
          where: str = "") -> T:
    """`schema` <- layers <- overrides, as a dataclass instance (its `__post_init__` runs)."""
    try:
        check_overrides(overrides)
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers,
                                 OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(where + one_line(err, schema)) from None
    except ConfigError as err:  # a dataclass's own __post_init__ check
        raise ConfigError(where + str(err)) from None


def to_yaml(obj: Any) -> str:
    """A settings dataclass as YAML; merging it back onto its schema gives an equal object."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj), resolve=True)


def flatten(obj: Any) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params and sweep tables."""
    container = OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(container, "")
    return out
