"""The registry of attention patterns: one module per pattern, found by its file name.

A new pattern is one file here defining a :class:`Pattern` subclass whose `name` is the module's
name (plus its test): training masks (dense and flex), the decoder's cache mask, self-speculative
decoding and exact-likelihood scoring all derive from the object (`dlm.tensor.patterns.base`), and
`attention.pattern` accepts it (the settings list this folder's modules without importing them).
Options beyond `block_size` are the subclass's dataclass fields, set through `attention.options`
(and `attention.clean_context` for patterns with a clean context).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Mapping

from dlm.settings import PATTERNS, ConfigError, check
from dlm.settings.experiment import load_config
from dlm.tensor.patterns.base import MaskFn, Pattern, Slots, block_causal

if TYPE_CHECKING:
    from dlm.settings import AttentionConfig, ExperimentConfig

__all__ = ["MaskFn", "Pattern", "Slots", "block_causal", "get", "load_experiment", "of", "registry"]


def _discover() -> dict[str, type[Pattern]]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        classes = [c for c in vars(module).values()
                   if isinstance(c, type) and issubclass(c, Pattern)
                   and c.__module__ == module.__name__]
        if len(classes) != 1 or classes[0].name != info.name:
            raise ImportError(f"{module.__name__}: must define one Pattern subclass "
                              f"with name = {info.name!r}")
        found[info.name] = classes[0]
    return found


_REGISTRY = _discover()
if tuple(sorted(_REGISTRY)) != PATTERNS:  # the settings list file names; both must agree
    raise ImportError(f"pattern modules {sorted(_REGISTRY)} differ from the settings' names "
                      f"{PATTERNS}")


def registry() -> dict[str, type[Pattern]]:
    """Name -> pattern class, in the settings' order."""
    return {name: _REGISTRY[name] for name in PATTERNS}


def option_names(cls: type[Pattern]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "block_size"]


def get(name: str, *, block_size: int = 1, clean_context: str = "block",
        options: Mapping[str, Any] | None = None) -> Pattern:
    """The pattern `name` at `block_size`; `clean_context` and `options` go to the patterns that
    take them."""
    check(name in _REGISTRY, "attention.pattern", name, "unknown pattern", PATTERNS)
    cls = _REGISTRY[name]
    allowed = option_names(cls)
    kwargs = dict(options or {})
    choices = ", ".join(k for k in allowed if k != "clean_context") or "none"
    for key in kwargs:
        check(key in allowed and key != "clean_context", f"attention.options.{key}", kwargs[key],
              f"not an option of the {name} pattern", choices)
    if "clean_context" in allowed:
        kwargs["clean_context"] = clean_context
    else:
        check(clean_context == "block", "attention.clean_context", clean_context,
              f"only block_clean has a clean half (attention.pattern={name!r}); allowed: block")
    try:
        return cls(block_size=block_size, **kwargs)
    except TypeError as err:  # a wrongly typed option
        raise ConfigError(f"attention.options={dict(options or {})!r}: {err}") from None


def of(attention: "AttentionConfig", block_size: int | None = None) -> Pattern:
    """The experiment's pattern (at `block_size`: a schedule's stage; default
    `attention.block_size`)."""
    return get(attention.pattern, block_size=block_size or attention.block_size,
               clean_context=attention.clean_context, options=attention.options)


def check_experiment(cfg: "ExperimentConfig") -> "ExperimentConfig":
    """The pattern's own rules across the experiment (settings check everything else)."""
    of(cfg.attention).check(cfg)
    return cfg


def load_experiment(*paths: str, overrides: list[str] | None = None) -> "ExperimentConfig":
    """`dlm.settings.load_config` and the pattern's rules: what every command that runs an
    experiment loads."""
    return check_experiment(load_config(*paths, overrides=overrides))
