"""YAML recipes: typed dataclasses, strict validation and ``dotted.key=value`` overrides.

This is the one place where a recipe is translated; the library itself takes plain arguments.
A recipe may leave out any key (the defaults below apply), but every key it gives must exist
and have the right type, otherwise :class:`~collabsurgery.errors.UserError` names the dotted
key and what is valid. Two YAML 1.1 quirks of PyYAML are smoothed over on purpose: a bare
``no`` (read as ``False``) is accepted for keys whose default is ``"no"``
(``train.mixed_precision``, ``run.resume``), and ``5e-4`` (read as a string) is accepted where
a float is expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from collabsurgery.common import atomic
from collabsurgery.errors import UserError

__all__ = [
    "DataConfig", "GraphSection", "ModelConfig", "ObjectiveSection", "Recipe", "RunConfig",
    "TrainConfig", "data_arguments", "load_recipe", "parse_overrides", "recipe_from_dict", "recipe_to_dict",
    "save_recipe",
]


def _f(default: Any, valid: str | None = None) -> Any:
    """A field with a default and an optional range: ``">= 1"``, ``"> 0"``, ``"(0, 1]"``, ...

    For lists the range applies to every element; ``None`` is never range-checked.
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"valid": valid})
    return field(default=default, metadata={"valid": valid})


@dataclass
class ModelConfig:
    name: str | list[str] = "cifar_resnet20"  # a list: one backbone per student (pattern peers)
    kwargs: dict[str, Any] = _f({})


#: graph arguments a recipe's ``graph`` section gets when it leaves them out, per pattern
#: (tree: paper 000's hierarchical CIFAR setting); other patterns use their builder's defaults
GRAPH_DEFAULTS: dict[str, dict[str, Any]] = {"tree": {"heads": 4, "split": ["layer1", "layer2"]}}
#: builder arguments the engine fills in from other sections
_GRAPH_ARGS_FROM = {"model": "model.name", "model_kwargs": "model.kwargs",
                    "input_size": "data.image_size"}


@dataclass
class GraphSection:
    """``pattern`` (a registered graph kind) and the arguments of its builder (``args``: every
    other key of the section, checked against the builder's signature; null means unset)."""

    pattern: str = "tree"
    args: dict[str, Any] = _f(GRAPH_DEFAULTS["tree"])
    OPEN = "args"


@dataclass
class ObjectiveSection:
    """``name`` (a registered objective) and its constructor arguments (``args``: every other
    key of the section, checked against the constructor's signature; null means unset)."""

    name: str = "consensus"
    args: dict[str, Any] = _f({})
    OPEN = "args"


@dataclass
class DataConfig:
    source: str = "builtin:digits"
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    holdout_split: str | None = None
    holdout_fraction: float = _f(0.1, "(0, 1)")
    image_size: int = _f(32, ">= 8")
    augment: bool = True
    hflip: bool = False  # the built-in digits must not be mirrored; CIFAR recipes turn it on
    label_noise: float = _f(0.0, "[0, 1)")
    views: Literal["shared", "per_head"] = "shared"  # per_head: each head its own augmentation
    subsets: bool = False  # each head trains on its own subset (paper 002's sub-set data learning)
    subset_overlap: float = _f(0.0, "[0, 1)")  # subsets also take round(o x share) of the others'
    num_workers: int = _f(0, ">= 0")
    max_train_examples: int | None = _f(None, ">= 1")


@dataclass
class TrainConfig:
    epochs: int = _f(10, ">= 1")
    batch_size: int = _f(64, ">= 1")
    lr: float = _f(0.1, "> 0")
    momentum: float = _f(0.9, "[0, 1)")
    nesterov: bool = True
    weight_decay: float = _f(5.0e-4, ">= 0")
    optimizer: Literal["sgd", "adam"] = "sgd"  # adam: paper 002's CGL setting (momentum unused)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = _f([], ">= 1")
    gamma: float = _f(0.1, "> 0")
    warmup_epochs: int = _f(0, ">= 0")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accum: int = _f(1, ">= 1")
    max_steps: int | None = _f(None, ">= 1")
    grad_clip: float | None = _f(None, "> 0")
    channels_last: bool = False


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str | None = None
    checkpoint_every: int = _f(0, ">= 0")
    keep: int = _f(2, ">= 1")
    resume: str = "no"
    log_with: list[str] = _f([])
    progress: bool = True


@dataclass
class Recipe:
    name: str = "demo"
    seed: int = _f(0, ">= 0")
    model: ModelConfig = field(default_factory=ModelConfig)
    graph: GraphSection = field(default_factory=GraphSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_name(self) -> str:
        """``run.name``, or the recipe name when that is null."""
        return self.run.name or self.name


# ---------------------------------------------------------------------------- the walker

def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return "mapping"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _in_range(v: float, valid: str) -> bool:
    if valid.startswith(">="):
        return v >= float(valid[2:])
    if valid.startswith(">"):
        return v > float(valid[1:])
    lo, hi = (float(s) for s in valid[1:-1].split(","))
    return (v >= lo if valid[0] == "[" else v > lo) and (v <= hi if valid[-1] == "]" else v < hi)


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, key: str, valid: str | None) -> Any:
    """Check ``value`` against type ``tp`` (and range ``valid``); return it converted."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            raise UserError(f"recipe key '{key}' expects {_type_name(tp)}, got null")
        for option in inner[:-1]:
            try:
                return _convert(value, option, key, valid)
            except UserError:
                pass
        try:
            return _convert(value, inner[-1], key, valid)
        except UserError:
            if len(inner) == 1:
                raise
            raise UserError(f"recipe key '{key}' expects {_type_name(tp)}, got {value!r}") \
                from None
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool):
            raise UserError(f"recipe key '{key}' must be one of "
                            f"{', '.join(map(str, get_args(tp)))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"recipe key '{key}' expects {_type_name(tp)}, got {value!r}")
        return [_convert(v, get_args(tp)[0], f"{key}[{i}]", valid) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"recipe key '{key}' expects a mapping with string keys, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads `5e-4` (no dot) as a string
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp]
    if not ok(value):
        raise UserError(f"recipe key '{key}' expects {_type_name(tp)}, "
                        f"got {value!r} ({type(value).__name__})")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"recipe key '{key}' must be a finite number, got {value!r}")
    if valid and tp in (int, float) and not _in_range(value, valid):
        raise UserError(f"recipe key '{key}' must be {_describe(valid)}, got {value!r}")
    return value


def _describe(valid: str) -> str:
    return valid if valid[0] in "<>" else f"in {valid}"


def _unknown(key: str, section: str, valid: Sequence[str], context: str = "") -> UserError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    if close:
        hint = f" (did you mean '{(section + '.') if section else ''}{close[0]}'?)"
    else:  # the right key in the wrong section, e.g. graph.beta for objective.beta
        homes = [name for name, tp in get_type_hints(Recipe).items()
                 if name != section and dataclasses.is_dataclass(tp)
                 and leaf in {f.name for f in dataclasses.fields(tp)}]
        hint = f" (did you mean '{homes[0]}.{leaf}'?)" if homes else ""
    where = f"in '{section}'" if section else "at the top level"
    where += f" {context}" if context else ""
    return UserError(f"unknown recipe key '{key}'{hint}; valid keys {where}: {', '.join(valid)}")


def _build(cls: type, raw: Any, section: str) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``: unknown keys and wrong types are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = f"recipe section '{section}'" if section else "a recipe"
        raise UserError(f"{what} must be a mapping of keys to values, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    open_field = getattr(cls, "OPEN", None)
    kwargs: dict[str, Any] = {open_field: {}} if open_field else {}
    for name, value in raw.items():
        key = f"{section}.{name}" if section else str(name)
        if open_field and name == open_field:
            raise UserError(f"recipe key '{key}' is not a key: write the arguments directly in "
                            f"'{section}' (e.g. {section}.heads: 4)")
        if open_field and name not in fields:
            kwargs[open_field][str(name)] = value  # checked against the builder in _check
            continue
        if name not in fields:
            raise _unknown(key, section, list(fields))
        if value is False and fields[name].default == "no":
            value = "no"  # YAML 1.1 reads a bare `no` as false
        kwargs[name] = _convert(value, hints[name], key, fields[name].metadata.get("valid"))
    return cls(**kwargs)


def _resolved_args(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` for keys not given, then null values dropped (null means unset)."""
    return {k: v for k, v in {**defaults, **given}.items() if v is not None}


def _check_graph(g: GraphSection, objective: ObjectiveSection) -> None:
    from collabsurgery.graphs import GRAPH_KINDS, builder_arguments
    from collabsurgery.objectives import OBJECTIVES, objective_arguments

    if g.pattern not in GRAPH_KINDS:
        raise UserError(f"recipe key 'graph.pattern' must be one of {', '.join(GRAPH_KINDS)}; "
                        f"got {g.pattern!r}")
    g.args = _resolved_args(g.args, GRAPH_DEFAULTS.get(g.pattern, {}))
    valid = [a for a in builder_arguments(g.pattern) if a not in _GRAPH_ARGS_FROM]
    for name in g.args:
        if name in _GRAPH_ARGS_FROM:
            raise UserError(f"recipe key 'graph.{name}' is set from '{_GRAPH_ARGS_FROM[name]}'; "
                            "remove it from the graph section")
        if name not in valid:
            if objective.name in OBJECTIVES and name in objective_arguments(objective.name):
                raise UserError(f"unknown recipe key 'graph.{name}' (did you mean "
                                f"'objective.{name}'?); valid keys in 'graph' for pattern "
                                f"'{g.pattern}': {', '.join(['pattern', *valid])}")
            raise _unknown(f"graph.{name}", "graph", ["pattern", *valid],
                           f"for pattern '{g.pattern}'")


def _check_objective(o: ObjectiveSection) -> None:
    from collabsurgery.objectives import OBJECTIVES, objective_arguments

    if o.name not in OBJECTIVES:
        raise UserError(f"recipe key 'objective.name' must be one of "
                        f"{', '.join(sorted(OBJECTIVES))}; got {o.name!r}")
    o.args = _resolved_args(o.args, {})
    valid = objective_arguments(o.name)
    for name in o.args:
        if name not in valid:
            raise _unknown(f"objective.{name}", "objective", ["name", *valid],
                           f"for objective '{o.name}'")


def _check(r: Recipe) -> Recipe:
    """Rules that involve more than one key."""
    for key, value in (("name", r.name), ("run.name", r.run.name)):
        if value is not None and (not value.strip(".") or "/" in value or "\\" in value):
            raise UserError(f"recipe key '{key}' must be a non-empty name without path separators, "
                            f"got {value!r}")
    _check_objective(r.objective)
    _check_graph(r.graph, r.objective)
    t = r.train
    if t.schedule == "step" and not t.milestones:
        raise UserError("recipe key 'train.milestones' is empty but train.schedule is 'step'; "
                        "give the epochs at which the lr is multiplied by train.gamma")
    # milestones/warmup beyond train.epochs are allowed: `train.epochs=1` must work on any recipe
    if t.milestones != sorted(set(t.milestones)):
        raise UserError(f"recipe key 'train.milestones' must be strictly increasing epochs, "
                        f"got {t.milestones}")
    if r.data.holdout_split is not None and r.data.holdout_split == r.data.test_split:
        raise UserError(f"recipe key 'data.holdout_split' is the test split "
                        f"'{r.data.test_split}': the best head would be chosen (and hold-out "
                        "objectives would learn) on the test set; set data.holdout_split: null "
                        "(a data.holdout_fraction carved from training) or another split")
    if not r.data.source:
        raise UserError("recipe key 'data.source' is empty; valid: builtin:digits, "
                        "builtin:digits-lowres, a save_to_disk directory, an imagefolder "
                        "directory, or a hub id")
    return r


# ---------------------------------------------------------------------------- public API

def recipe_from_dict(raw: dict[str, Any] | None) -> Recipe:
    """Validate a (possibly partial) nested mapping and return the full :class:`Recipe`."""
    return _check(_build(Recipe, raw, ""))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error (plain YAML
    loading lets the last one silently win)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse ``dotted.key=value`` strings into ``(["dotted", "key"], value)`` pairs.

    The value is read with ``yaml.safe_load``: ``train.epochs=1`` gives an int,
    ``graph.split=[layer2,layer3]`` a list, ``data.source=/x/y`` a string.
    """
    parsed = []
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise UserError(f"malformed override {item!r}; expected dotted.key=value, "
                            "e.g. train.epochs=1")
        try:
            value = _load_yaml(text)
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: value is not valid YAML "
                            f"({str(e).splitlines()[0]})") from None
        parsed.append((key.split("."), value))
    return parsed


def _apply(raw: dict[str, Any], path: list[str], value: Any) -> None:
    cls: Any = Recipe
    node = raw
    for depth, name in enumerate(path):
        key = ".".join(path[: depth + 1])
        if cls is not None:  # inside the schema: check the key exists
            names = [f.name for f in dataclasses.fields(cls)]
            if getattr(cls, "OPEN", None) and name not in names:
                cls = None  # an argument of the section's builder: checked when validated
                if depth == len(path) - 1:
                    node[name] = value
                    break
                raise UserError(f"override '{'.'.join(path)}': '{key}' is not a section")
            if name not in names:
                raise _unknown(key, ".".join(path[:depth]), names)
            tp = get_type_hints(cls)[name]
            cls = tp if dataclasses.is_dataclass(tp) else None
            if depth < len(path) - 1 and cls is None and get_origin(tp) is not dict:
                raise UserError(f"override '{'.'.join(path)}': '{key}' is not a section "
                                f"(it holds {_type_name(tp)})")
        if depth == len(path) - 1:
            node[name] = value
        else:
            if node.get(name) is None:
                node[name] = {}
            if not isinstance(node[name], dict):
                raise UserError(f"override '{'.'.join(path)}': '{key}' is not a section")
            node = node[name]


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (``None``: all defaults), apply overrides, validate strictly."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe file '{path}' does not exist (give a path to a .yaml recipe)")
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"recipe file '{path}' is not text (not UTF-8); valid: a YAML "
                            "recipe such as recipes/demo.yaml") from None
        except yaml.YAMLError as e:
            raise UserError(f"recipe file '{path}' is not valid YAML: "
                            f"{' '.join(str(e).split())}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"recipe file '{path}' must hold a mapping of sections, got {raw!r}")
    for key_path, value in parse_overrides(overrides):
        _apply(raw, key_path, value)
    return recipe_from_dict(raw)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain nested dicts/lists/scalars (the arguments of an open
    section written directly in it, as a recipe file has them)."""
    tree = dataclasses.asdict(recipe)
    for section in ("graph", "objective"):
        tree[section].update(tree[section].pop("args"))
    return tree


def data_arguments(data: DataConfig) -> dict[str, Any]:
    """The ``data`` section as :func:`collabsurgery.data.datasets.load_splits` keyword arguments."""
    provider_keys = ("num_workers", "views", "subsets", "subset_overlap")
    return {k: v for k, v in dataclasses.asdict(data).items() if k not in provider_keys}


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (every key, defaults included); returns the path."""
    return atomic.write_text(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
