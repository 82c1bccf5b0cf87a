"""The objective registry: a name -> an :class:`~.base.Objective` class, and how to test it.

Each objective registers itself where it is defined, as the graph kinds do
(:func:`collabsurgery.graphs.base.register_graph`)::

    @register_objective("dml", example=ObjectiveExample())
    class MutualLoss(Objective): ...

The :class:`ObjectiveExample` tells ``tests/test_objective_contract.py`` how to train the
objective on a small graph, so a new objective is covered by registering it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from collabsurgery.common.arguments import check_arguments, declarations
from collabsurgery.errors import UserError
from collabsurgery.graphs.base import Example as GraphExample
from collabsurgery.objectives.base import TEACHER_KEYS, Objective

#: what a graph's heads see in the contract tests, on graphs that take a batch per head
DATA_MODES = ("shared", "views", "subsets")


@dataclass(frozen=True)
class ObjectiveExample:
    """How the contract tests train an objective: on which graph kinds, with what.

    kinds: the graph kinds it trains; None: every registered kind, later ones included.
    args:  constructor arguments, small, switching on every module the objective can own, so
           each is checked. An objective that ``needs_teacher`` gets its ``teacher`` from the
           tests (a frozen plain backbone of the case's model), not from here.
    graph: kind -> ``(backbone, split_points) -> builder arguments``, laid over that kind's own
           registered example for a graph the objective needs (OKDDip: a feature per peer).
    data:  the batches on graphs with ``per_head_input``: "shared" (one batch, labels ``[B]``),
           "views" (head h its own images of the same examples, labels ``[B]``) or "subsets"
           (head h its own examples, labels ``[H, B]``; needs ``own_examples``). Graphs whose
           heads share layers always get one shared batch.
    """

    kinds: tuple[str, ...] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, GraphExample] = field(default_factory=dict)
    data: str = "shared"

    def __post_init__(self) -> None:
        if self.data not in DATA_MODES:
            raise ValueError(f"example data {self.data!r}; valid: {', '.join(DATA_MODES)}")
        if self.kinds is not None:
            unknown = sorted(set(self.graph) - set(self.kinds))
            if unknown:
                raise ValueError(f"example graph arguments for kinds {unknown} it does not "
                                 f"train; its kinds: {', '.join(self.kinds)}")


OBJECTIVES: dict[str, type[Objective]] = {}
EXAMPLES: dict[str, ObjectiveExample] = {}
ObjectiveClass = TypeVar("ObjectiveClass", bound=type[Objective])


def register_objective(name: str, example: ObjectiveExample
                       ) -> Callable[[ObjectiveClass], ObjectiveClass]:
    """A class decorator making the objective buildable by ``name``, with ``example`` for the
    contract tests; a name registered twice is a ValueError (the first registration stands)."""
    if not isinstance(example, ObjectiveExample):
        raise TypeError(f"objective '{name}': example must be an ObjectiveExample, got "
                        f"{example!r}")

    def decorate(cls: ObjectiveClass) -> ObjectiveClass:
        if name in OBJECTIVES:
            raise ValueError(f"objective '{name}' is already registered")
        if example.data == "subsets" and not cls.own_examples:
            raise ValueError(f"objective '{name}': example data 'subsets' needs own_examples")
        OBJECTIVES[name] = cls
        EXAMPLES[name] = example
        return cls
    return decorate


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; UserError naming the registered objectives."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def objective_arguments(name: str) -> list[str]:
    """The recipe keys of objective ``name``: its declared constructor arguments, with a
    teacher's keys (TEACHER_KEYS) for one that ``needs_teacher``; UserError for an unknown name."""
    cls = objective_class(name)
    valid = list(declarations(cls))
    if cls.needs_teacher:
        valid += [key for key in TEACHER_KEYS if key not in valid]
    return valid


def check_objective_arguments(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` checked against objective ``name``'s declaration (its annotated constructor):
    the values as the constructor takes them. An unknown name or a bad value is a one-line
    ArgumentError naming the argument; ``teacher`` (a module the engine loads from the recipe's
    TEACHER_KEYS) passes unchecked."""
    return check_arguments(objective_class(name), args, f"objective '{name}'", skip=("teacher",))


def build_objective(name: str, **kwargs: Any) -> Objective:
    """Build objective ``name`` from arguments checked against its declaration
    (:func:`check_objective_arguments`); an unknown name or a bad argument is a UserError."""
    return objective_class(name)(**check_objective_arguments(name, kwargs))
