"""Arguments checked once, against one declaration: a function's annotated signature.

A graph builder (and an objective) declares each argument once, its type and range beside it::

    def build_tree(model, heads: Annotated[int, Field(ge=1, description="number of heads")] = 2,
                   rescale: Literal["backprop", "loss", "none"] = "backprop", ...)

:func:`check_arguments` validates a call's keyword arguments against that signature with
pydantic, strictly (``True`` is not an integer, ``"1"`` is not a number, a float is not an
integer), except that PyYAML's ``5e-4`` (read as a string: no dot) is a number. A bad value is
an :class:`~collabsurgery.errors.ArgumentError` on one line that names the argument and says
what is valid (``heads must be an integer >= 1, got 0``); an unknown name suggests the closest
valid one. :func:`describe` words a declared type for messages and help texts; the recipe
schema (:mod:`collabsurgery.config.recipe`) is declared and worded the same way.

Only :mod:`collabsurgery.errors` and third-party packages are imported here.
"""
from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import re
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from collabsurgery.errors import ArgumentError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_float(value: Any) -> Any:
    """``"5e-4"`` -> 0.0005: PyYAML reads a float without a dot as a string."""
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


#: a float that also takes PyYAML's ``5e-4`` string; every declared ``float`` is read as one
Number = Annotated[float, BeforeValidator(_yaml_float)]
#: strict types, finite numbers; arbitrary classes (nn.Module) are checked with isinstance
STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

_UNION = (Union, types.UnionType)
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Collection)
_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans"),
          dict: ("a mapping", "mappings"), type(None): ("null", "null")}


@dataclass(frozen=True)
class Declared:
    """One declared argument: its annotation (``Any`` when it has none), its default
    (``inspect.Parameter.empty`` when it has none) and the description its ``Field`` gives."""

    name: str
    annotation: Any
    default: Any
    description: str

    @property
    def required(self) -> bool:
        """Whether a call must give it."""
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        """What the argument accepts, in words (null left out where null is the default)."""
        return describe(self.annotation, null=self.default is not None)

    @functools.cached_property
    def adapter(self) -> TypeAdapter:
        """The pydantic validator of the declared type (built once, on first use)."""
        return TypeAdapter(_lenient(self.annotation), config=STRICT)


def _target(func: Callable) -> Callable:
    """The function whose signature declares the arguments (a class: its ``__init__``)."""
    return func.__init__ if isinstance(func, type) else func  # type: ignore[misc]


@functools.cache
def declarations(func: Callable) -> dict[str, Declared]:
    """The keyword arguments ``func`` declares (a class: its constructor's), in order."""
    hints = get_type_hints(_target(func), include_extras=True)
    found = {}
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        found[name] = Declared(name, annotation, param.default, _description(annotation))
    return found


def takes_any_keyword(func: Callable) -> bool:
    """Whether ``func`` has a ``**kwargs`` (unknown names are then its own business)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())


class UnknownArgument(ArgumentError):
    """An argument ``owner`` does not take: ``"<owner> takes no argument 'x' (did you mean
    'y'?); valid: ..."``. As an ArgumentError it still names the argument (``.argument``) and
    the problem (``.problem``) for a caller that re-words it as a recipe key."""

    def __init__(self, argument: str, owner: str, valid: Collection[str]):
        listing = f"{suggest(argument, valid)}; valid: {', '.join(valid) or 'none'}"
        super().__init__(argument, f"is not an argument of {owner}{listing}")
        self.args = (f"{owner} takes no argument '{argument}'{listing}",)


def suggest(name: str, valid: Collection[str], prefix: str = "") -> str:
    """``" (did you mean 'prefix+closest'?)"`` for the valid name closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def check_arguments(func: Callable, given: Mapping[str, Any], owner: str,
                    skip: Collection[str] = ()) -> dict[str, Any]:
    """``given`` validated against ``func``'s declaration: the values as ``func`` should get
    them (``5e-4`` strings as floats). Arguments in ``skip`` pass unchecked (a model, a module).

    Raises :class:`UnknownArgument` for a name ``func`` does not take and
    :class:`~collabsurgery.errors.ArgumentError` for a missing required argument or a value of
    the wrong type or range. ``owner`` names ``func`` in messages (``"pattern 'tree'"``).
    """
    declared = declarations(func)
    valid = [name for name in declared if name not in skip]
    checked = {}
    for name, value in given.items():
        if name not in declared:
            if takes_any_keyword(func):
                checked[name] = value
                continue
            raise UnknownArgument(name, owner, valid)
        checked[name] = value if name in skip else check_value(declared[name], value)
    for name in valid:
        if declared[name].required and name not in given:
            raise ArgumentError(name, f"is missing; give {declared[name].describe()}")
    return checked


def check_value(declared: Declared, value: Any) -> Any:
    """``value`` validated against one declared argument (ArgumentError naming it)."""
    try:
        return declared.adapter.validate_python(value)
    except ValidationError:
        raise ArgumentError(declared.name, f"must be {declared.describe()}, got "
                                           f"{shown(value)}") from None


def shown(value: Any) -> str:
    """A value as a message quotes it (``None`` as YAML's ``null``)."""
    return "null" if value is None else repr(value)


# ---------------------------------------------------------------------------- words


def _is_sequence(tp: Any) -> bool:
    return tp in _SEQUENCES or get_origin(tp) in _SEQUENCES


def _parts(tp: Any) -> tuple[Any, list[Any], str]:
    """``Annotated[T, ...]`` -> ``(T, its constraints, its Field description)``."""
    constraints: list[Any] = []
    description = ""
    while get_origin(tp) is Annotated:
        for meta in tp.__metadata__:
            if isinstance(meta, FieldInfo):
                constraints += meta.metadata
                description = description or meta.description or ""
            elif isinstance(meta, annotated_types.GroupedMetadata):  # Interval(ge=0, lt=1)
                constraints += list(meta)
            else:
                constraints.append(meta)
        tp = get_args(tp)[0]
    return tp, constraints, description


def _description(tp: Any) -> str:
    """The description of a declared type's ``Field``, also inside ``Optional[...]``."""
    if get_origin(tp) in _UNION:
        return next((d for d in map(_description, get_args(tp)) if d), "")
    return _parts(tp)[2]


def _bounds(constraints: list[Any]) -> str:
    """``" >= 1"``, ``" in [0, 1)"``, ... for the range constraints among ``constraints``."""
    low = high = None
    for c in constraints:
        if isinstance(c, annotated_types.Ge):
            low = ("[", ">=", c.ge)
        elif isinstance(c, annotated_types.Gt):
            low = ("(", ">", c.gt)
        elif isinstance(c, annotated_types.Le):
            high = ("]", "<=", c.le)
        elif isinstance(c, annotated_types.Lt):
            high = (")", "<", c.lt)
    if low and high:
        return f" in {low[0]}{low[2]:g}, {high[2]:g}{high[0]}"
    bound = low or high
    return f" {bound[1]} {bound[2]:g}" if bound else ""


def _length(constraints: list[Any]) -> str:
    """``"2 "``, ``"at least 1 "``, ... for a list's length constraints among ``constraints``."""
    low = next((c.min_length for c in constraints if isinstance(c, annotated_types.MinLen)), 0)
    high = next((c.max_length for c in constraints if isinstance(c, annotated_types.MaxLen)),
                None)
    if high is None:
        return f"at least {low} " if low else ""
    return f"{high} " if low == high else f"{low} to {high} " if low else f"at most {high} "


def describe(tp: Any, null: bool = True, plural: bool = False) -> str:
    """What a declared type accepts, in words: ``Annotated[int, Field(ge=1)]`` -> ``"an
    integer >= 1"``, ``Sequence[str] | None`` -> ``"a list of strings or null"``. ``null``:
    whether to mention null (leave it out where null means "unset")."""
    tp, constraints, _ = _parts(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNION:
        return " or ".join(describe(a, plural=plural) for a in args
                           if null or a is not type(None))
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(map(str, args))
    if _is_sequence(tp):
        inner = describe(args[0], plural=True) if args and args[0] is not Any else "values"
        return f"{'lists' if plural else 'a list'} of {_length(constraints)}{inner}"
    if origin is dict:
        return "a mapping" + (" with string keys" if args and args[0] is str else "")
    if tp is Any:
        return "anything"
    words = _WORDS.get(tp) or (f"a {getattr(tp, '__name__', tp)}",) * 2
    return words[plural] + _bounds(constraints)


def _lenient(tp: Any) -> Any:
    """``tp`` with every ``float`` in it read as :data:`Number` (so ``5e-4`` strings pass)."""
    if tp is float:
        return Number
    origin, args = get_origin(tp), get_args(tp)
    if not args or origin is Literal:
        return tp
    if origin is Annotated:
        return Annotated[(_lenient(args[0]), *tp.__metadata__)]
    if origin in _UNION:
        return Union[tuple(_lenient(a) for a in args)]
    return origin[tuple(_lenient(a) for a in args)]


def bare(tp: Any) -> Any:
    """A declared type without its constraints and without ``None``:
    ``Annotated[int, Field(ge=1)] | None`` -> ``int`` (a union of several types stays one)."""
    tp = _parts(tp)[0]
    if get_origin(tp) in _UNION:
        options = [a for a in get_args(tp) if a is not type(None)]
        return bare(options[0]) if len(options) == 1 else Union[tuple(options)]
    return tp


def from_text(tp: Any, text: str) -> Any:
    """A command-line word as a value of a declared type: comma-separated for a list, lists
    separated by ``;`` for a list of lists, ``true``/``false`` for a boolean. ValueError with
    what was expected when ``text`` is none of the type's forms (ranges are not checked: the
    value still goes through :func:`check_arguments`)."""
    tp = _parts(tp)[0]
    options = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in _UNION \
        else [tp]
    for option in options:
        try:
            return _parse(option, text)
        except ValueError:
            continue
    raise ValueError(f"expected {text_form(tp)}, got '{text}'")


def _parse(tp: Any, text: str) -> Any:
    tp = _parts(tp)[0]
    origin, args = get_origin(tp), get_args(tp)
    if _is_sequence(tp):
        inner = args[0] if args else str
        if _is_sequence(_parts(inner)[0]):
            return [_parse(inner, part) for part in text.split(";")]
        return [_parse(inner, part.strip()) for part in text.split(",") if part.strip()]
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(text)
    if tp is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if tp in (int, float):
        return tp(text)
    if tp is str or tp is Any:
        return text
    raise ValueError(text)


def text_form(tp: Any) -> str:
    """How :func:`from_text` reads a type, in words (``"comma-separated integers"``)."""
    tp = _parts(tp)[0]
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNION:  # a string that may also be a list is written as the list
        options = [a for a in args if a is not type(None)]
        listed = any(_is_sequence(_parts(a)[0]) for a in options)
        return " or ".join(text_form(a) for a in options if not (listed and a is str))
    if _is_sequence(tp):
        inner = _parts(args[0])[0] if args else str
        if _is_sequence(inner):
            return f"';'-separated lists of {text_form(inner)}"
        return f"comma-separated {describe(inner, null=False, plural=True)}"
    return describe(tp, null=False)
