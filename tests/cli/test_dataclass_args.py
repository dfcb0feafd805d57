"""argparse flags generated from dataclasses: one flag per field, its type, choices and help from the field's
annotation, default and docstring; unset flags stay unset, so the dataclass default is the only default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import pytest

from dlm.cli.dataclass_args import add_dataclass_arguments, dataclass_from_args, field_docs, given, parse_bool
from dlm.settings import ConfigError, check


@dataclass
class Knobs:
    steps: int = 3
    """Optimizer steps."""
    rate: float = 0.5
    """Share of the budget, 50% by default."""
    name: str = "run"
    """Run name,
    written over two lines."""
    limit: Optional[int] = None
    """Examples per task; none: all."""
    sizes: List[int] = field(default_factory=lambda: [1, 4])
    """Batch sizes."""
    tags: List[str] = field(default_factory=list)
    """Extra tags."""
    mode: Literal["fast", "exact"] = "fast"
    """fast | exact."""
    verbose: bool = False
    """Print every step."""
    use_cache: bool = True
    """Reuse the KV cache."""
    scored: Optional[bool] = None
    """Exact match; none: whenever answers exist."""
    undocumented: int = 7
    derived: int = field(default=0, init=False)
    """Computed, never a flag."""

    def __post_init__(self) -> None:
        check(self.steps > 0, "knobs.steps", self.steps, "must be > 0")


@dataclass
class MoreKnobs(Knobs):
    extra: str = "x"
    """A field of the subclass."""


@dataclass
class Needs:
    reference: str
    """The AR model folder."""


@dataclass
class Unsupported:
    mapping: Dict[str, int] = field(default_factory=dict)


def parser_for(cls: type = Knobs, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, cls, **kwargs)
    return parser


def parse(*argv: str, cls: type = Knobs, **kwargs) -> argparse.Namespace:
    return parser_for(cls, **kwargs).parse_args(list(argv))


def action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def argparse_error(capsys, *argv: str, cls: type = Knobs, **kwargs) -> str:
    """The one `error:` line argparse prints before exiting 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv, cls=cls, **kwargs)
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return line


# -- values ---------------------------------------------------------------------------------------------------
def test_int_float_str_and_optional_flags_parse_into_typed_field_values():
    args = parse("--steps", "5", "--rate", "0.25", "--name", "x", "--limit", "3")
    knobs = dataclass_from_args(args, Knobs)
    assert (knobs.steps, knobs.rate, knobs.name, knobs.limit) == (5, 0.25, "x", 3)
    assert isinstance(knobs.rate, float) and isinstance(knobs.limit, int)


def test_unset_flags_are_absent_so_the_dataclass_defaults_apply():
    args = parse()
    assert vars(args) == {} and given(args, Knobs) == {}
    assert dataclass_from_args(args, Knobs) == Knobs()


def test_given_names_only_the_flags_on_the_command_line():
    assert given(parse("--limit", "2", "--verbose"), Knobs) == {"limit": 2, "verbose": True}


def test_a_list_is_a_comma_list_and_an_empty_string_is_an_empty_list():
    assert parse("--sizes", "2,8").sizes == [2, 8]
    assert parse("--sizes", " 3 , ,5").sizes == [3, 5]
    assert parse("--sizes", "").sizes == []
    assert parse("--tags", "a,b").tags == ["a", "b"]


def test_a_bad_list_item_exits_via_argparse(capsys):
    line = argparse_error(capsys, "--sizes", "2,x")
    assert line == "t: error: argument --sizes: invalid comma-separated ints value: '2,x'"


def test_a_literal_field_offers_its_choices_and_a_bad_choice_exits_via_argparse(capsys):
    parser = parser_for()
    assert action(parser, "mode").choices == ("fast", "exact") and action(parser, "mode").metavar == "{fast,exact}"
    assert parse("--mode", "exact").mode == "exact"
    line = argparse_error(capsys, "--mode", "slow")
    assert line == "t: error: argument --mode: invalid choice: 'slow' (choose from 'fast', 'exact')"


def test_a_bool_defaulting_to_false_is_a_switch():
    assert parse("--verbose").verbose is True
    assert not hasattr(parse(), "verbose")


def test_a_bool_defaulting_to_true_is_a_no_switch(capsys):
    assert parse("--no-use-cache").use_cache is False
    assert dataclass_from_args(parse(), Knobs).use_cache is True
    assert "unrecognized arguments: --use-cache" in argparse_error(capsys, "--use-cache")


def test_an_optional_bool_takes_both_spellings_and_unset_means_none():
    assert parse("--scored").scored is True
    assert parse("--no-scored").scored is False
    assert dataclass_from_args(parse(), Knobs).scored is None


def test_prefix_mode_keeps_field_names_and_takes_true_false_values():
    args = parse("--knobs.use_cache", "false", "--knobs.verbose", "TRUE", "--knobs.scored", "0",
                 "--knobs.steps", "4", "--knobs.sizes", "1,2", prefix="knobs.")
    assert given(args, Knobs, prefix="knobs.") == {"steps": 4, "sizes": [1, 2], "verbose": True, "use_cache": False,
                                                   "scored": False}
    assert dataclass_from_args(args, Knobs, prefix="knobs.") == Knobs(steps=4, sizes=[1, 2], verbose=True,
                                                                      use_cache=False, scored=False)


def test_prefix_mode_rejects_a_value_that_is_not_true_or_false(capsys):
    line = argparse_error(capsys, "--knobs.verbose", "maybe", prefix="knobs.")
    assert line == "t: error: argument --knobs.verbose: 'maybe': must be true or false"


def test_parse_bool_reads_true_false_one_and_zero_in_any_case():
    assert [parse_bool(t) for t in ("true", "False", "1", "0")] == [True, False, True, False]
    with pytest.raises(argparse.ArgumentTypeError, match="^'yes': must be true or false$"):
        parse_bool("yes")


def test_aliases_are_other_spellings_of_the_same_flag():
    aliases = {"steps": ["--num-steps", "-n"], "use_cache": ["--no-cache"]}
    assert [parse(flag, "6", aliases=aliases).steps for flag in ("--steps", "--num-steps", "-n")] == [6, 6, 6]
    assert parse("--no-cache", aliases=aliases).use_cache is False


def test_skipped_and_non_init_fields_get_no_flag():
    parser = parser_for(skip=("undocumented",))
    dests = {a.dest for a in parser._actions}
    assert "undocumented" not in dests and "derived" not in dests and "steps" in dests


# -- help -----------------------------------------------------------------------------------------------------
def test_help_is_the_field_docstring_plus_the_default():
    parser = parser_for()
    assert action(parser, "steps").help == "Optimizer steps. (default: 3)"
    assert action(parser, "sizes").help == "Batch sizes. (default: 1,4)"
    assert action(parser, "tags").help == "Extra tags. (default: none)"
    assert action(parser, "limit").help == "Examples per task; none: all. (default: None)"
    assert action(parser, "name").help == "Run name, written over two lines. (default: run)"
    assert action(parser, "undocumented").help == "(default: 7)"
    assert action(parser, "steps").metavar == "STEPS"


def test_a_percent_sign_in_a_docstring_survives_help_formatting():
    parser = parser_for()
    assert action(parser, "rate").help == "Share of the budget, 50%% by default. (default: 0.5)"
    assert "50% by default" in " ".join(parser.format_help().split())


def test_field_docs_include_the_base_class_fields():
    docs = field_docs(MoreKnobs)
    assert docs["extra"] == "A field of the subclass." and docs["steps"] == "Optimizer steps."
    assert "undocumented" not in docs


def test_a_field_without_default_is_a_required_flag(capsys):
    assert action(parser_for(Needs), "reference").help == "The AR model folder. (required)"
    assert dataclass_from_args(parse("--reference", "ar", cls=Needs), Needs) == Needs("ar")
    assert argparse_error(capsys, cls=Needs) == "t: error: the following arguments are required: --reference"


def test_a_field_type_without_a_command_line_form_fails_when_building_the_parser():
    with pytest.raises(TypeError, match="no command-line form for a field of type"):
        parser_for(Unsupported)


# -- validation -----------------------------------------------------------------------------------------------
def test_post_init_validates_the_given_values():
    with pytest.raises(ConfigError, match=r"^knobs\.steps=0: must be > 0$"):
        dataclass_from_args(parse("--steps", "0"), Knobs)


def test_fixed_values_override_the_flags_and_are_validated_too():
    assert dataclass_from_args(parse("--steps", "5"), Knobs, steps=9).steps == 9
    with pytest.raises(ConfigError, match=r"^knobs\.steps=-1: must be > 0$"):
        dataclass_from_args(parse(), Knobs, steps=-1)
