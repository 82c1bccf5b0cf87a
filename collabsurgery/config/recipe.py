"""YAML recipes: a strict schema, ``dotted.key=value`` overrides, and the one place where a
recipe becomes the library's plain arguments.

The schema below declares each key once, its type and range beside it, as graph builders
declare their arguments; :func:`collabsurgery.common.arguments.check_arguments` checks both.
A recipe may leave out any key (the defaults apply), but every key it gives must exist and
have the right type, otherwise :class:`~collabsurgery.errors.UserError` names the dotted key
and what is valid. The ``graph`` and ``objective`` sections hold, besides ``pattern``/``name``,
the arguments of that builder or objective, checked against its own declaration (null: unset).
Two YAML 1.1 quirks of PyYAML are smoothed over on purpose: a bare ``no`` (read as ``False``)
is accepted for keys whose default is ``"no"`` (``train.mixed_precision``, ``run.resume``), and
``5e-4`` (read as a string) is accepted where a float is expected.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, get_origin, get_type_hints

import yaml
from pydantic import BeforeValidator, Field

from collabsurgery.common import atomic
from collabsurgery.common.arguments import check_arguments, describe, suggest
from collabsurgery.errors import ArgumentError, UserError, warn

__all__ = [
    "DataConfig", "GraphSection", "ModelConfig", "ObjectiveSection", "Recipe", "RunConfig",
    "TrainConfig", "data_arguments", "load_recipe", "parse_overrides", "recipe_from_dict",
    "recipe_to_dict", "save_recipe",
]

Count = Annotated[int, Field(ge=1)]
Index = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
#: on a key whose default is "no": YAML 1.1 reads a bare `no` as false
_NO = BeforeValidator(lambda value: "no" if value is False else value)


def _copied(default: Any) -> Any:
    return field(default_factory=lambda: copy.deepcopy(default))


@dataclass
class ModelConfig:
    name: str | list[str] = "cifar_resnet20"  # a list: one backbone per student (pattern peers)
    kwargs: dict[str, Any] = _copied({})
    # initial weights: a weights file (an export, or a .safetensors/.pth/.pt/.bin state dict),
    # a training run directory (the head it keeps), or true (timm's local cache, nothing
    # downloaded); peers: also one entry per student (null: untrained); a classifier for
    # another class count starts fresh; graph.copies: every copy from it, or head 0's only
    pretrained: bool | str | list[bool | str | None] | None = None


#: graph arguments a recipe's ``graph`` section gets when it leaves them out, per pattern
#: (tree: paper 000's hierarchical CIFAR setting), under the objective's ``graph_defaults``
#: (ONE, OKDDip: no rescaling); other patterns use their builder's defaults
GRAPH_DEFAULTS: dict[str, dict[str, Any]] = {"tree": {"heads": 4, "split": ["layer1", "layer2"]}}
#: builder arguments the engine fills in from other sections
_GRAPH_ARGS_FROM = {"model": "model.name", "model_kwargs": "model.kwargs",
                    "input_size": "data.image_size", "pretrained": "model.pretrained"}


@dataclass
class GraphSection:
    """``pattern`` (a registered graph kind) and the arguments of its builder (``args``: every
    other key of the section, checked against the builder's declaration; null means unset)."""

    pattern: str = "tree"
    args: dict[str, Any] = _copied(GRAPH_DEFAULTS["tree"])


@dataclass
class ObjectiveSection:
    """``name`` (a registered objective) and its constructor arguments (``args``: every other
    key of the section, checked against the constructor's declaration; null means unset)."""

    name: str = "consensus"
    args: dict[str, Any] = _copied({})


#: sections whose keys besides these fields are the arguments (``args``) of what they name
_OPEN = (GraphSection, ObjectiveSection)


@dataclass
class DataConfig:
    source: str = "builtin:digits"
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    holdout_split: str | None = None
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    # small: resize + centre crop, pad-and-crop (+ flip, cutout), statistics of the training
    # split; timm: the model's data configuration and timm's transforms (RandomResizedCrop,
    # flips, colour jitter, auto_augment, random erasing; resize by crop_pct + centre crop)
    preset: Literal["small", "timm"] = "small"
    image_size: Annotated[int, Field(ge=8)] | None = 32  # null (preset timm): the model's
    test_image_size: Annotated[int, Field(ge=8)] | None = None  # hold-out/test; null: image_size
    augment: bool = True
    hflip: bool = False  # the built-in digits must not be mirrored; CIFAR recipes turn it on
    cutout: Index = 0  # small: one square patch of this many pixels zeroed per view (0: off)
    # preset timm (timm's defaults; null: the model's data configuration)
    scale: Annotated[list[float], Field(min_length=2, max_length=2)] = _copied([0.08, 1.0])
    ratio: Annotated[list[float], Field(min_length=2, max_length=2)] = _copied([0.75, 4 / 3])
    color_jitter: Annotated[float, Field(ge=0)] | None = 0.4  # off with auto_augment (not 3a)
    auto_augment: str | None = None  # timm policy: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0...
    reprob: Annotated[float, Field(ge=0, le=1)] = 0.0  # random erasing probability
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None = None  # eval: resize to size/crop_pct
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming",
                           "random"] | None = None
    # null: the model's (timm) or the training split's statistics (small)
    mean: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None
    std: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None
    label_noise: Fraction = 0.0
    views: Literal["shared", "per_head"] = "shared"  # per_head: each head its own augmentation
    subsets: bool = False  # each head trains on its own subset (paper 002's sub-set data learning)
    subset_overlap: Fraction = 0.0  # subsets also take round(o x share) of the others'
    num_workers: Index = 0
    prefetch_factor: Count | None = None  # batches each worker loads ahead; null: PyTorch's 2
    max_train_examples: Count | None = None
    classes: list[int | str] | None = None  # keep only these classes (indices or names)


@dataclass
class TrainConfig:
    epochs: Count = 10
    batch_size: Count = 64
    lr: Positive = 0.1
    # the optimizer: any name of timm.optim.list_optimizers() (sgd, momentum, adamw, lamb, lion...)
    optimizer: str = "sgd"
    momentum: Fraction = 0.9
    nesterov: bool = True  # optimizers with a Nesterov option (sgd); sgd with momentum 0: off
    weight_decay: Annotated[float, Field(ge=0)] = 5.0e-4
    decay_norm_and_bias: bool = False  # as timm: no decay on norm weights and biases
    optimizer_args: dict[str, Any] = _copied({})  # more keyword arguments (betas, eps, ...)
    # the schedule, timm's names: cosine, tanh, step, multistep, poly, plateau, constant
    schedule: str = "cosine"
    milestones: list[Count] = _copied([])  # multistep: epochs at which lr is multiplied by gamma
    decay_epochs: Positive | None = None  # step: lr x gamma every decay_epochs epochs
    gamma: Positive = 0.1  # timm's decay_rate (step, multistep, plateau; poly: the power)
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    warmup_epochs: Index = 0
    warmup_lr: Annotated[float, Field(ge=0)] = 0.0  # lr at the start of the warm-up
    scheduler_args: dict[str, Any] = _copied({})  # more create_scheduler_v2 arguments
    # soft targets (timm's Mixup): alphas, 0 = off
    mixup: Annotated[float, Field(ge=0)] = 0.0
    cutmix: Annotated[float, Field(ge=0)] = 0.0
    mixup_prob: Annotated[float, Field(ge=0, le=1)] = 1.0
    mixup_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5
    label_smoothing: Fraction = 0.0
    # EMA of the weights (timm's ModelEmaV3); null = off
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    ema_warmup: bool = False  # ModelEmaV3's use_warmup: decay ramps up over the first updates
    # true (needs ema_decay): the run's best head is the EMA weights' best on hold-out, and
    # export/evaluate use the EMA weights unless given --live; false: the live weights (--ema)
    ema_select: bool = False
    mixed_precision: Annotated[Literal["no", "fp16", "bf16"], _NO] = "no"
    grad_accum: Count = 1
    max_steps: Count | None = None
    grad_clip: Positive | None = None
    channels_last: bool = False
    compile: bool | dict[str, Any] = False  # true, or torch.compile arguments (regional)


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str | None = None
    checkpoint_every: Index = 0
    keep: Count = 2
    resume: Annotated[str, _NO] = "no"
    log_with: list[str] = _copied([])
    progress: bool = True


@dataclass
class Recipe:
    name: str = "demo"
    seed: Index = 0
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


# ---------------------------------------------------------------------------- validation

def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_class(cls: type, name: str) -> type | None:
    """The schema class of key ``name`` of ``cls`` when it is a section, else None."""
    tp = get_type_hints(cls)[name]
    return tp if dataclasses.is_dataclass(tp) else None


def _unknown(key: str, section: str, valid: Sequence[str], context: str = "") -> UserError:
    leaf = key.rsplit(".", 1)[-1]
    hint = suggest(leaf, valid, f"{section}." if section else "")
    if not hint:  # the right key in the wrong section, e.g. graph.beta for objective.beta
        homes = [name for name in _fields(Recipe) if name != section
                 and (cls := _section_class(Recipe, name)) and leaf in _fields(cls)]
        hint = f" (did you mean '{homes[0]}.{leaf}'?)" if homes else ""
    where = f"in '{section}'" if section else "at the top level"
    where += f" {context}" if context else ""
    return UserError(f"unknown recipe key '{key}'{hint}; valid keys {where}: {', '.join(valid)}")


def _build(cls: type, raw: Any, section: str) -> Any:
    """Schema class ``cls`` from mapping ``raw``: an unknown key or a bad value is a UserError
    naming its dotted key and what is valid."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = f"recipe section '{section}'" if section else "a recipe"
        raise UserError(f"{what} must be a mapping of keys to values, got {raw!r}")
    names = _fields(cls)
    values: dict[str, Any] = {"args": {}} if cls in _OPEN else {}
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{section}.{name}" if section else str(name)
        if cls in _OPEN and name == "args":
            raise UserError(f"recipe key '{key}' is not a key: write the arguments directly in "
                            f"'{section}' (e.g. {section}.heads: 4)")
        if cls in _OPEN and name not in names:
            values["args"][str(name)] = value  # checked against the builder in _check
        elif name not in names:
            raise _unknown(key, section, names)
        elif sub := _section_class(cls, name):
            sections[name] = _build(sub, value, key)
        else:
            values[name] = value
    try:
        values = check_arguments(cls, values, f"section '{section}'")
    except ArgumentError as err:
        key = f"{section}.{err.argument}" if section else err.argument
        raise UserError(f"recipe key '{key}' {err.problem}") from None
    return cls(**values, **sections)


def _resolved_args(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` for keys not given, then null values dropped (null means unset)."""
    return {k: v for k, v in {**defaults, **given}.items() if v is not None}


def _check_graph(g: GraphSection, objective: ObjectiveSection) -> None:
    from collabsurgery.graphs import GRAPH_KINDS, builder_arguments
    from collabsurgery.objectives import OBJECTIVES, objective_arguments

    if g.pattern not in GRAPH_KINDS:
        raise UserError(f"recipe key 'graph.pattern' must be one of {', '.join(GRAPH_KINDS)}; "
                        f"got {g.pattern!r}")
    valid = [a for a in builder_arguments(g.pattern) if a not in _GRAPH_ARGS_FROM]
    method = OBJECTIVES[objective.name].graph_defaults if objective.name in OBJECTIVES else {}
    g.args = _resolved_args(g.args, {**GRAPH_DEFAULTS.get(g.pattern, {}),
                                     **{k: v for k, v in method.items() if k in valid}})
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
    """The section's keys against the objective's declaration (its annotated constructor, with
    the teacher keys of one that needs a teacher); the values are checked against the same
    declaration when the objective is built (``train.engine.make_objective``)."""
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


#: timm scheduler names the engine steps (``constant``: the lr after warm-up, never decayed)
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "plateau", "constant")


def _check_train(t: TrainConfig) -> None:
    """Optimizer and schedule names (timm's) and the keys each schedule needs."""
    import timm.optim

    try:
        timm.optim.get_optimizer_info(t.optimizer.lower().split("_")[-1])
    except ValueError:
        raise UserError(f"recipe key 'train.optimizer' is {t.optimizer!r}, which timm does not "
                        f"know; valid: {', '.join(timm.optim.list_optimizers())}") from None
    if t.schedule not in SCHEDULES:
        raise UserError(f"recipe key 'train.schedule' is {t.schedule!r}; valid (timm's names): "
                        f"{', '.join(SCHEDULES)}")
    if t.schedule == "step" and t.decay_epochs is None:
        if not t.milestones:
            raise UserError("recipe key 'train.decay_epochs' is unset but train.schedule is "
                            "'step' (lr x train.gamma every decay_epochs epochs); set it, or use "
                            "schedule 'multistep' with train.milestones")
        warn("train.schedule 'step' with train.milestones is timm's 'multistep' (lr x gamma at "
             "each milestone); read as multistep")
        t.schedule = "multistep"
    if t.schedule == "multistep" and not t.milestones:
        raise UserError("recipe key 'train.milestones' is empty but train.schedule is "
                        "'multistep'; give the epochs at which the lr is multiplied by "
                        "train.gamma")
    # milestones/warmup beyond train.epochs are allowed: `train.epochs=1` must work on any recipe
    if t.milestones != sorted(set(t.milestones)):
        raise UserError(f"recipe key 'train.milestones' must be strictly increasing epochs, "
                        f"got {t.milestones}")


def _check(r: Recipe) -> Recipe:
    """Rules that involve more than one key."""
    for key, value in (("name", r.name), ("run.name", r.run.name)):
        if value is not None and (not value.strip(".") or "/" in value or "\\" in value):
            raise UserError(f"recipe key '{key}' must be a non-empty name without path separators, "
                            f"got {value!r}")
    _check_objective(r.objective)
    _check_graph(r.graph, r.objective)
    _check_train(r.train)
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
    """Set ``raw[path[0]][path[1]]... = value``, refusing a key the schema does not have."""
    cls: type | None = Recipe
    node = raw
    dotted = ".".join(path)
    for depth, name in enumerate(path):
        key, last = ".".join(path[: depth + 1]), depth == len(path) - 1
        if cls is not None:  # inside the schema: check the key exists
            names = _fields(cls)
            if cls in _OPEN and name not in names:
                cls = None  # an argument of the section's builder: checked when validated
                if not last:
                    raise UserError(f"override '{dotted}': '{key}' is not a section")
            elif name not in names:
                raise _unknown(key, ".".join(path[:depth]), names)
            else:
                tp = get_type_hints(cls, include_extras=True)[name]
                cls = _section_class(cls, name)
                if not last and cls is None and get_origin(tp) is not dict:
                    raise UserError(f"override '{dotted}': '{key}' is not a section "
                                    f"(it holds {describe(tp)})")
        if last:
            node[name] = value
        else:
            if node.get(name) is None:
                node[name] = {}
            if not isinstance(node[name], dict):
                raise UserError(f"override '{dotted}': '{key}' is not a section")
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
    provider_keys = ("num_workers", "prefetch_factor", "views", "subsets", "subset_overlap")
    return {k: v for k, v in dataclasses.asdict(data).items() if k not in provider_keys}


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (every key, defaults included); returns the path."""
    return atomic.write_text(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
