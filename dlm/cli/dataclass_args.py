"""argparse flags generated from settings dataclasses, so a field is defined once: its name, type,
default and docstring become the flag, its choices and its help.

Why not jsonargparse: the flags users already type (`--thresholds 0.5,0.9` comma lists,
`--no-cache`, `--decode.threshold 0.9`) keep their spelling, building the parser imports no torch,
and every value still goes through the dataclass (and its `__post_init__` checks) exactly once.
A flag that is not given is not set, so the dataclass default is the only default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Callable, Literal, Sequence, Union


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (first line)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            if is_field and _is_str(after):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _is_str(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def _unwrap_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return kind


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [item(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}s"
    return parse


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be true or false")
    return text.lower() in ("true", "1")


def _parser_for(kind: Any) -> tuple[Callable[[str], Any], Sequence[Any] | None]:
    """(string -> value, choices) for a field type."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return type(choices[0]), choices
    if typing.get_origin(kind) in (list, Sequence, tuple):
        # argparse checks choices per value, not per list item:
        # the dataclass's own check names the bad item
        item, _ = _parser_for(typing.get_args(kind)[0])
        return _comma_list(item), None
    if kind is bool:
        return parse_bool, None
    if kind in (int, float, str):
        return kind, None
    if kind is Any:
        return str, None
    raise TypeError(f"no command-line form for a field of type {kind!r}")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, list):
        value = ",".join(map(str, value)) or "none"
    return f"default: {value}"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                            aliases: dict[str, Sequence[str]] | None = None,
                            skip: Sequence[str] = ()) -> None:
    """One flag per field of `cls`: `--max-new-tokens`
    (or `--decode.max_new_tokens` under `prefix="decode."`).

    Booleans are switches (`--ignore-eos`; a field that defaults to True gets `--no-<name>`) without
    a prefix, and take true/false with one. `aliases` adds other spellings of a field's flag.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = _unwrap_optional(hints[f.name])
        dest = prefix + f.name
        name = f"--{prefix}{f.name}" if prefix else f"--{f.name.replace('_', '-')}"
        doc = docs.get(f.name, "")
        help_text = doc if "(default" in doc else f"{doc} ({_default_text(f)})".strip()
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        common = dict(dest=dest, help=help_text.replace("%", "%%"), default=argparse.SUPPRESS)
        if kind is bool and not prefix and hints[f.name] is bool:
            if f.default is True:
                name, common["action"] = f"--no-{f.name.replace('_', '-')}", "store_false"
            else:
                common["action"] = "store_true"
        elif kind is bool and not prefix:  # Optional[bool]: unset means "decide for me"
            common["action"] = argparse.BooleanOptionalAction
        else:
            parse, choices = _parser_for(kind)
            common.update(type=parse, choices=choices, required=required,
                          metavar=_metavar(f.name, choices))
        parser.add_argument(name, *(aliases or {}).get(f.name, ()), **common)


def _metavar(name: str, choices: Sequence[Any] | None) -> str:
    return "{" + ",".join(map(str, choices)) + "}" if choices else name.upper()


def given(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """Field name -> value of the flags of `cls` that were given on the command line."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
            if hasattr(args, prefix + f.name)}


def dataclass_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "",
                        **fixed: Any) -> Any:
    """`cls` from the given flags (the rest at their defaults),
    validated by its own `__post_init__`."""
    return cls(**{**given(args, cls, prefix=prefix), **fixed})
