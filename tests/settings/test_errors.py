"""`dlm.settings.errors`: the one-line `key=value: rule; allowed: ...` message, the small check helpers, the
`Literal` choice checks of objects built in code, and real omegaconf merge errors turned into one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

import pytest
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlm.settings import ConfigError, check
from dlm.settings.errors import (
    NO_VALUE,
    check_choices,
    check_positive_int,
    divisors,
    fields_at,
    literal_choices,
    one_line,
)

Color = Literal["red", "green", "blue"]


@dataclass
class Leaf:
    color: Color = "red"
    shade: Optional[Color] = None
    depth: int = 1


@dataclass
class Branch:
    leaf: Leaf = field(default_factory=Leaf)
    colors: List[Color] = field(default_factory=lambda: ["red"])
    weight: float = 1.0


@dataclass
class Tree:
    name: str = MISSING
    branch: Branch = field(default_factory=Branch)
    steps: int = 3
    extra: Dict[str, Any] = field(default_factory=dict)


def omegaconf_error(dotlist: list[str], schema: type = Tree) -> OmegaConfBaseException:
    """The error omegaconf raises when `dotlist` is merged onto `schema` and its container read back."""
    with pytest.raises(OmegaConfBaseException) as err:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(dotlist))
        OmegaConf.to_container(merged, throw_on_missing=True)
    return err.value


# -- check -----------------------------------------------------------------------------------------
def test_check_passes_silently_when_ok():
    assert check(True, "a.b", 3, "must be odd", [1, 3]) is None


def test_check_message_names_key_value_rule_and_allowed_values():
    with pytest.raises(ConfigError, match=r"^a\.b=4: must be odd; allowed: 1, 3, 5$"):
        check(False, "a.b", 4, "must be odd", [1, 3, 5])


def test_check_shows_the_value_as_repr():
    with pytest.raises(ConfigError, match=r"^a\.mode='fast': unknown mode; allowed: slow$"):
        check(False, "a.mode", "fast", "unknown mode", ["slow"])


def test_check_takes_allowed_as_a_ready_string():
    with pytest.raises(ConfigError, match=r"^a=0: must be > 0; allowed: 1 or more$"):
        check(False, "a", 0, "must be > 0", "1 or more")


def test_check_without_allowed_has_no_allowed_part():
    with pytest.raises(ConfigError, match=r"^a=\[\]: needs an item$"):
        check(False, "a", [], "needs an item")


def test_check_without_a_value_names_the_key_alone():
    with pytest.raises(ConfigError, match=r"^a\.typo: unknown key; allowed: x, y$"):
        check(False, "a.typo", rule="unknown key", allowed=["x", "y"])
    with pytest.raises(ConfigError, match=r"^a\.typo: unknown key$"):
        check(False, "a.typo", NO_VALUE, "unknown key")


def test_check_shows_none_as_a_value():
    with pytest.raises(ConfigError, match=r"^a=None: invalid$"):
        check(False, "a", None)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -- check_positive_int, divisors ------------------------------------------------------------------
@pytest.mark.parametrize("value", [1, 7, 10**6])
def test_check_positive_int_accepts_positive_ints(value):
    check_positive_int("k", value)


@pytest.mark.parametrize("value, shown", [(0, "0"), (-2, "-2"), (1.5, "1.5"), (2.0, "2.0"), ("3", "'3'"),
                                          (True, "True"), (False, "False"), (None, "None")])
def test_check_positive_int_rejects_everything_else(value, shown):
    with pytest.raises(ConfigError, match=rf"^k={shown}: must be a positive integer$"):
        check_positive_int("k", value)


def test_check_positive_int_lets_none_through_only_when_optional():
    check_positive_int("k", None, optional=True)
    with pytest.raises(ConfigError, match=r"^k=0: must be a positive integer$"):
        check_positive_int("k", 0, optional=True)


@pytest.mark.parametrize("n, expected", [(1, [1]), (7, [1, 7]), (12, [1, 2, 3, 4, 6, 12]),
                                         (96, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96])])
def test_divisors_are_ascending_and_include_one_and_n(n, expected):
    assert divisors(n) == expected


# -- fields_at -------------------------------------------------------------------------------------
def test_fields_at_the_top_level():
    assert fields_at(Tree, "") == ["name", "branch", "steps", "extra"]


def test_fields_at_nested_dataclasses():
    assert fields_at(Tree, "branch") == ["leaf", "colors", "weight"]
    assert fields_at(Tree, "branch.leaf") == ["color", "shade", "depth"]


@pytest.mark.parametrize("dotted", ["nope", "branch.nope", "steps", "extra", "branch.leaf.color"])
def test_fields_at_unknown_or_non_dataclass_paths_is_empty(dotted):
    assert fields_at(Tree, dotted) == []


# -- literal_choices -------------------------------------------------------------------------------
def test_literal_choices_of_a_literal():
    assert literal_choices(Color) == ("red", "green", "blue")


def test_literal_choices_of_an_optional_literal():
    assert literal_choices(Optional[Color]) == ("red", "green", "blue")
    assert literal_choices(Color | None) == ("red", "green", "blue")


@pytest.mark.parametrize("kind", [int, str, Optional[int], List[Color], Dict[str, Any], Any])
def test_literal_choices_of_other_types_is_none(kind):
    assert literal_choices(kind) is None


# -- check_choices ---------------------------------------------------------------------------------
def test_check_choices_accepts_valid_objects():
    check_choices(Tree(name="t", branch=Branch(leaf=Leaf(color="blue", shade="green"), colors=["red", "blue"])))


def test_check_choices_allows_none_for_an_optional_literal():
    check_choices(Leaf(shade=None))


def test_check_choices_names_the_field_of_a_bad_literal():
    with pytest.raises(ConfigError, match=r"^color='pink': unknown color; allowed: red, green, blue$"):
        check_choices(Leaf(color="pink"))


def test_check_choices_checks_an_optional_literal_that_is_set():
    with pytest.raises(ConfigError, match=r"^leaf\.shade='pink': unknown shade; allowed: red, green, blue$"):
        check_choices(Leaf(shade="pink"), "leaf.")


def test_check_choices_walks_nested_dataclasses_with_dotted_keys():
    tree = Tree(name="t", branch=Branch(leaf=Leaf(color="pink")))
    with pytest.raises(ConfigError, match=r"^tree\.branch\.leaf\.color='pink': unknown color; "
                                          r"allowed: red, green, blue$"):
        check_choices(tree, "tree.")


def test_check_choices_checks_every_item_of_a_list_of_literals():
    with pytest.raises(ConfigError, match=r"^branch\.colors='pink': unknown color; allowed: red, green, blue$"):
        check_choices(Tree(name="t", branch=Branch(colors=["red", "pink"])))


def test_check_choices_accepts_an_empty_list_of_literals():
    check_choices(Branch(colors=[]))


# -- one_line: real omegaconf errors ---------------------------------------------------------------
def test_one_line_unknown_key_suggests_a_near_match_and_lists_the_allowed_keys():
    err = omegaconf_error(["name=t", "branch.leaf.colour=red"])
    assert one_line(err, Tree) == ("branch.leaf.colour: unknown key (did you mean 'color'?); "
                                   "allowed: color, shade, depth")


def test_one_line_unknown_top_level_key_lists_the_top_level_fields():
    err = omegaconf_error(["name=t", "stepz=4"])
    assert one_line(err, Tree) == "stepz: unknown key (did you mean 'steps'?); allowed: name, branch, steps, extra"


def test_one_line_unknown_key_without_a_near_match_has_no_suggestion():
    err = omegaconf_error(["name=t", "branch.zzz=1"])
    assert one_line(err, Tree) == "branch.zzz: unknown key; allowed: leaf, colors, weight"


def test_one_line_unknown_attribute_read_is_an_unknown_key():
    with pytest.raises(OmegaConfBaseException) as err:
        OmegaConf.structured(Tree).branch.wieght
    assert one_line(err.value, Tree) == ("branch.wieght: unknown key (did you mean 'weight'?); "
                                         "allowed: leaf, colors, weight")


def test_one_line_missing_mandatory_value_is_required():
    err = omegaconf_error(["steps=4"])
    assert one_line(err, Tree) == "name: required"


def test_one_line_bad_literal_choice_names_the_field_and_the_choices():
    err = omegaconf_error(["name=t", "branch.leaf.color=pink"])
    assert one_line(err, Tree) == "branch.leaf.color='pink': unknown color; allowed: red, green, blue"


def test_one_line_bad_optional_literal_choice():
    err = omegaconf_error(["name=t", "branch.leaf.shade=pink"])
    assert one_line(err, Tree) == "branch.leaf.shade='pink': unknown shade; allowed: red, green, blue"


def test_one_line_type_error_keeps_omegaconfs_first_line():
    err = omegaconf_error(["name=t", "branch.leaf.depth=deep"])
    assert one_line(err, Tree) == ("branch.leaf.depth='deep': "
                                   "Value 'deep' of type 'str' could not be converted to Integer")


def test_one_line_is_always_one_line():
    for dotlist in (["branch.leaf.colour=red"], ["steps=4"], ["name=t", "branch.leaf.color=pink"],
                    ["name=t", "branch.weight=heavy"]):
        assert "\n" not in one_line(omegaconf_error(dotlist), Tree)
