"""One validation path: an argument is checked against its declaration (an annotated
signature), strictly, with one-line messages that name it and say what is valid."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Literal

import pytest
from pydantic import Field

from collabsurgery.common.arguments import (UnknownArgument, check_arguments, declarations,
                                            describe, from_text)
from collabsurgery.errors import ArgumentError, UserError


def toy(model: object, heads: Annotated[int, Field(ge=1, description="number of heads")] = 2,
        p: Annotated[float, Field(ge=0, lt=1)] = 0.5, split: str | Sequence[str] | None = None,
        branches: Sequence[Annotated[int, Field(ge=1)]] | None = None,
        paths: list[list[int]] | None = None, mode: Literal["a", "b"] = "a",
        students: Annotated[int, Field(ge=1)] | None = None,
        recompute: bool | Literal["selective"] = False) -> None:
    """A builder-like function: every argument declared in its signature."""


def check(**given):
    return check_arguments(toy, given, "pattern 'toy'", skip=("model",))


@pytest.mark.parametrize("given, message", [
    ({"heads": 0}, "heads must be an integer >= 1, got 0"),
    ({"heads": True}, "heads must be an integer >= 1, got True"),   # a bool is not an integer
    ({"heads": "2"}, "heads must be an integer >= 1, got '2'"),     # nor is a string
    ({"heads": 2.0}, "heads must be an integer >= 1, got 2.0"),     # nor a float
    ({"p": 1.0}, "p must be a number in [0, 1), got 1.0"),
    ({"p": "abc"}, "p must be a number in [0, 1), got 'abc'"),
    ({"p": float("nan")}, "p must be a number in [0, 1), got nan"),
    ({"split": ["layer1", 3]}, "split must be a string or a list of strings, got ['layer1', 3]"),
    ({"branches": [2, 0]}, "branches must be a list of integers >= 1, got [2, 0]"),
    ({"paths": [[0, True]]}, "paths must be a list of lists of integers, got [[0, True]]"),
    ({"mode": "c"}, "mode must be one of a, b, got 'c'"),
    ({"students": 0}, "students must be an integer >= 1, got 0"),   # null: its default, unsaid
    ({"recompute": "x"}, "recompute must be true or false or selective, got 'x'"),
])
def test_a_bad_value_is_one_line_naming_the_argument_and_what_is_valid(given, message):
    with pytest.raises(ArgumentError) as info:
        check(**given)
    assert str(info.value) == message
    assert info.value.argument == next(iter(given))
    assert isinstance(info.value, UserError)


def test_valid_values_pass_and_come_back_as_the_function_should_get_them():
    assert check(p="5e-4") == {"p": 5e-4}          # PyYAML reads 5e-4 (no dot) as a string
    assert check(p=0) == {"p": 0.0} and isinstance(check(p=0)["p"], float)
    assert check(split="layer1,layer2", branches=(2, 2), students=None) == {
        "split": "layer1,layer2", "branches": (2, 2), "students": None}
    assert check(recompute="selective", model=object) == {"recompute": "selective",
                                                          "model": object}


def test_an_unknown_argument_suggests_the_closest_and_lists_the_valid_ones():
    with pytest.raises(UnknownArgument) as info:
        check(hedas=2)
    assert str(info.value) == ("pattern 'toy' takes no argument 'hedas' (did you mean 'heads'?); "
                               "valid: heads, p, split, branches, paths, mode, students, "
                               "recompute")
    assert info.value.argument == "hedas"
    assert info.value.problem.startswith("is not an argument of pattern 'toy' (did you mean")


def test_a_missing_required_argument_is_named():
    def needs(teacher: str, alpha: float = 0.5) -> None:
        pass

    with pytest.raises(ArgumentError, match="teacher is missing; give a string"):
        check_arguments(needs, {"alpha": 0.1}, "objective 'kd'")


def test_a_class_declares_its_constructor_arguments():
    class Loss:
        def __init__(self, temperature: Annotated[float, Field(gt=0)] = 1.0) -> None:
            self.temperature = temperature

    assert list(declarations(Loss)) == ["temperature"]
    with pytest.raises(ArgumentError, match=r"temperature must be a number > 0, got 0"):
        check_arguments(Loss, {"temperature": 0}, "objective 'loss'")


def test_declarations_carry_descriptions_and_words():
    declared = declarations(toy)
    assert declared["heads"].description == "number of heads"
    assert declared["heads"].default == 2 and not declared["heads"].required
    assert describe(declared["split"].annotation) == "a string or a list of strings or null"
    assert declared["split"].describe() == "a string or a list of strings"


@pytest.mark.parametrize("name, text, value", [
    ("heads", "3", 3),
    ("p", "0.25", 0.25),
    ("split", "layer1,layer2", "layer1,layer2"),   # the builder splits it
    ("branches", "2,2", [2, 2]),
    ("paths", "0,1;1,0", [[0, 1], [1, 0]]),
    ("mode", "b", "b"),
    ("recompute", "true", True),
    ("recompute", "selective", "selective"),
])
def test_command_line_words_are_read_as_the_declared_type(name, text, value):
    assert from_text(declarations(toy)[name].annotation, text) == value


@pytest.mark.parametrize("name, text, message", [
    ("branches", "2,x", "expected comma-separated integers, got '2,x'"),
    ("paths", "0,x", "expected ';'-separated lists of comma-separated integers, got '0,x'"),
    ("recompute", "maybe", "expected true or false or selective, got 'maybe'"),
])
def test_unreadable_command_line_words_say_what_was_expected(name, text, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        from_text(declarations(toy)[name].annotation, text)
