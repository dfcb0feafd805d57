"""YAML files and `key=value` overrides merged onto a settings dataclass by omegaconf, errors in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlm.settings.errors import ConfigError, one_line

T = TypeVar("T")


def yaml_layers(path: Path, *, label: str = "config", chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file and, first, the parents it names with a top-level `base: other.yaml` (relative to it)."""
    if not path.is_file():
        raise ConfigError(f"{label}={str(path)!r}: file not found")
    if path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, path.resolve()))
        raise ConfigError(f"base={path.name!r}: the files name each other as base ({cycle})")
    layer = OmegaConf.load(path)
    base = layer.pop("base", None)
    parents = yaml_layers(path.parent / base, label=label, chain=(*chain, path.resolve())) if base else []
    return [*parents, layer]


def check_overrides(overrides: Sequence[str]) -> None:
    for bad in (o for o in overrides if "=" not in o):
        raise ConfigError(f"{bad!r}: override must be key=value; e.g. attention.block_size=32")


def merge(schema: type[T], layers: Sequence[Any], overrides: Sequence[str] = (), *, where: str = "") -> T:
    """`schema` <- layers <- overrides, as a dataclass instance (its `__post_init__` runs)."""
    try:
        check_overrides(overrides)
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers, OmegaConf.from_dotlist(list(overrides)))
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
