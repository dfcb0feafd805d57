"""The one error type for bad settings, the one check helper, the one formatter of omegaconf errors.

Every message is one line, `key=value: rule; allowed: ...` (docs/design.md §2), so the CLI prints it
as `error: ...` and exits 2 before any compute starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import sys
import types
import typing
from typing import Any, Literal, Sequence, Union

from omegaconf.errors import OmegaConfBaseException

NO_VALUE = object()
"""`check(..., value=NO_VALUE)`: the message names the key alone."""


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the key, the value and what is allowed."""


def check(ok: bool, key: str, value: Any = NO_VALUE, rule: str = "invalid",
          allowed: str | Sequence[Any] = "") -> None:
    """Raise `ConfigError("key=value: rule; allowed: ...")` unless `ok`."""
    if ok:
        return
    allowed = allowed if isinstance(allowed, str) else ", ".join(map(str, allowed))
    shown = "" if value is NO_VALUE else f"={value!r}"
    raise ConfigError(f"{key}{shown}: {rule}" + (f"; allowed: {allowed}" if allowed else ""))


_DEPRECATED: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """One `deprecated: OLD; use NEW` line on stderr, once per process per setting."""
    if old not in _DEPRECATED:
        _DEPRECATED.add(old)
        print(f"deprecated: {old}; use {new}", file=sys.stderr)


def check_positive_int(key: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
          "must be a positive integer")


def check_block_size(block_size: Any, length: int | None = None, *,
                     key: str = "attention.block_size",
                     length_key: str = "data.max_length") -> None:
    """The block-size rule, defined once: a positive integer that divides the sequence length
    (when given)."""
    check_positive_int(key, block_size)
    if length is not None:
        check_positive_int(length_key, length)
        check(length % block_size == 0, key, block_size, f"must divide {length_key}={length}",
              divisors(length))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fields_at(schema: type, dotted: str) -> list[str]:
    """Field names of the (nested) dataclass at `dotted` inside `schema`."""
    node: Any = schema
    for part in filter(None, dotted.split(".")):
        is_dataclass = dataclasses.is_dataclass(node)
        match = {f.name: f for f in dataclasses.fields(node)}.get(part) if is_dataclass else None
        node = _field_type(node, match) if match else None
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _field_type(owner: type, field: dataclasses.Field) -> Any:
    return typing.get_type_hints(owner).get(field.name)


_CHOICES = re.compile(r"Invalid value '?(?P<value>.*?)'?, expected one of \[(?P<allowed>.*)\]")


def one_line(err: OmegaConfBaseException, schema: type) -> str:
    """An omegaconf merge/validation error as `key...: rule; allowed: ...`,
    with a near-match suggestion."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "config"
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if "not in" in msg or "Missing key" in msg:
        allowed = fields_at(schema, key.rsplit(".", 1)[0] if "." in key else "")
        hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{key}: unknown key{suggestion}; allowed: {', '.join(allowed)}"
    missing = re.search(r"[Mm]issing mandatory value:? ?(?P<name>[\w.]*)", msg)
    if missing:
        return f"{key if key != 'config' else missing['name'] or key}: required"
    choices = _CHOICES.search(msg)
    if choices:
        allowed = choices["allowed"].replace("'", "")
        name = key.rsplit(".", 1)[-1]
        # a list item: patterns[1] -> pattern
        name = name.split("[")[0].removesuffix("s") if "[" in name else name
        return f"{key}={choices['value']!r}: unknown {name}; allowed: {allowed}"
    return f"{key}={getattr(err, 'value', None)!r}: {msg}"


def literal_choices(kind: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal[...]` (or `Optional[Literal[...]]`) type, else None."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    if typing.get_origin(kind) in (Union, types.UnionType):
        inner = [literal_choices(a) for a in typing.get_args(kind) if a is not type(None)]
        return inner[0] if len(inner) == 1 and inner[0] is not None else None
    return None


@functools.lru_cache(maxsize=None)
def _field_choices(cls: type) -> dict[str, tuple[tuple[Any, ...] | None, bool]]:
    """Per field of the dataclass `cls`: its `Literal` values (or None) and whether it is a list.
    Cached: resolving the string annotations costs ~0.4 ms, and a DecodeConfig is built on every
    generate call."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        is_list = typing.get_origin(kind) is list
        out[f.name] = (literal_choices(typing.get_args(kind)[0] if is_list else kind), is_list)
    return out


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every `Literal` field of the dataclass `obj` (and of the dataclasses nested in it) holds one
    of its values; omegaconf checks this at merge time, this covers objects built in code."""
    for name, (choices, is_list) in _field_choices(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{name}.")
            continue
        for item in (value if is_list else [value]):
            if choices is not None and item is not None:
                check(item in choices, prefix + name, item,
                      f"unknown {name.removesuffix('s') if is_list else name}", choices)
