"""The objective contract (the hook protocol of ``objectives/base.py``), checked for every
registered objective x the graph kinds its example names.

timm-style: an objective is covered by registering it (``@register_objective(name, example=...)``);
the graph, the arguments and the batches come from its :class:`ObjectiveExample`, never from a
branch on the name here. For every case: declarations that hold together and an ``attach`` that
leaves the graph alone, a finite loss, a finite gradient to every trainable parameter of graph
and objective, the objective's state round trip, a bit-exact resume from a checkpoint written
between two SGD steps, exports with exactly the plain model's keys, and soft targets (mixup,
cutmix, label smoothing) taken exactly as the labels or refused with a reason. A toy objective
registered by a fixture gets the same checks, and fails them when it breaks the protocol.

CPU, cifar_resnet20 at 16 px, batch 2, 10 classes; each graph is built once and copied.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.functional import one_hot

import collabsurgery as cs
from collabsurgery.errors import UserError
from collabsurgery.graphs import (GRAPH_KINDS, GraphOutput, TrainingGraph, build_graph,
                                  builder_arguments)
from collabsurgery.graphs.base import EXAMPLES as GRAPH_EXAMPLES
from collabsurgery.models import backbones
from collabsurgery.objectives import (EXAMPLES, OBJECTIVES, ConsensusLoss, LossContext, MutualLoss,
                                      Objective, ObjectiveExample, Step, build_objective,
                                      register_objective)
from collabsurgery.objectives.base import cross_entropy_per_head, probe
from collabsurgery.rundir import checkpoint
from collabsurgery.rundir.checkpoint import Progress
from collabsurgery.train.engine import Collaboration

BACKBONE = "cifar_resnet20"
SIZE = (3, 16, 16)
CLASSES = 10
BATCH = 2

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    """One registered objective on one graph kind."""

    name: str
    kind: str

    def __str__(self) -> str:
        return f"{self.name}-{self.kind}"


def cases_of(names: Iterable[str]) -> list[Case]:
    """Every objective of ``names`` x the graph kinds its example names (None: all of them)."""
    return [Case(name, kind) for name in names
            for kind in (EXAMPLES[name].kinds or tuple(GRAPH_KINDS))]


# collected before conftest's session fixture registers its test objective: the library's only
CASES = cases_of(OBJECTIVES)


# ---------------------------------------------------------------------------- building a case

@functools.lru_cache(maxsize=None)
def split_points(backbone: str) -> tuple[str, ...]:
    return tuple(cs.splits(backbone, input_size=SIZE))


@functools.lru_cache(maxsize=None)
def _built(kind: str, model_json: str, args_json: str) -> TrainingGraph:
    torch.manual_seed(0)
    return build_graph(kind, json.loads(model_json), input_size=SIZE,
                       model_kwargs={"num_classes": CLASSES}, **json.loads(args_json))


def fresh_graph(case: Case) -> TrainingGraph:
    """The case's graph: its kind's example with the objective's additions, always the same
    initialisation (a copy of one build)."""
    points = list(split_points(BACKBONE))
    args = dict(GRAPH_EXAMPLES[case.kind](BACKBONE, points))
    extra = EXAMPLES[case.name].graph.get(case.kind)
    args.update(extra(BACKBONE, points) if extra else {})
    model = args.pop("model", BACKBONE)
    if "execution" in builder_arguments(case.kind):  # auto times the modes: builds could differ
        args["execution"] = "loop"
    return copy.deepcopy(_built(case.kind, json.dumps(model), json.dumps(args, sort_keys=True)))


@functools.lru_cache(maxsize=None)
def teacher() -> nn.Module:
    """A plain backbone of the case's model, the teacher of an objective that needs one."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        return backbones.resolve(BACKBONE, num_classes=CLASSES)[0].eval()


def make_objective(case: Case, graph: TrainingGraph, seed: int) -> Objective:
    """The case's objective as the engine makes it: built, checked, attached to ``graph``;
    ``seed`` initialises the modules it owns."""
    args = dict(EXAMPLES[case.name].args)
    if OBJECTIVES[case.name].needs_teacher:
        args["teacher"] = teacher()
    torch.manual_seed(seed)
    objective = build_objective(case.name, **args)
    objective.check_compatible(graph.num_heads, CLASSES)
    objective.attach(graph)
    return objective


def data_mode(case: Case, graph: TrainingGraph) -> str:
    """The example's batches where the graph takes one per head, else one shared batch."""
    return EXAMPLES[case.name].data if graph.per_head_input else "shared"


def batch(mode: str, heads: int, seed: int, size: int = BATCH
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, labels)``: shared ``[B, ...]`` and ``[B]``; views ``[H, B, ...]`` and ``[B]``;
    subsets ``[H, B, ...]`` and ``[H, B]``."""
    g = torch.Generator().manual_seed(seed)
    lead = (size,) if mode == "shared" else (heads, size)
    x = torch.randn(*lead, *SIZE, generator=g)
    labels = torch.randint(0, CLASSES, lead if mode == "subsets" else (size,), generator=g)
    return x, labels


def step_at(i: int) -> Step:
    return Step(seed=0, epoch=0, batch=i, epochs=1, batches=2)


def setup(case: Case, seed: int = 0) -> tuple[Collaboration, torch.optim.Optimizer, str]:
    graph = fresh_graph(case)
    collab = Collaboration(graph, make_objective(case, graph, seed))
    optimizer = torch.optim.SGD(collab.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    return collab, optimizer, data_mode(case, graph)


def sgd_step(collab: Collaboration, optimizer: torch.optim.Optimizer, mode: str, i: int) -> None:
    """Optimizer step ``i`` in train mode (the global RNG, dropout's, seeded by the step), then,
    for an objective that ``wants_holdout``, an epoch end with hold-out logits."""
    collab.train()
    x, labels = batch(mode, collab.graph.num_heads, seed=100 + i)
    torch.manual_seed(1000 + i)
    out = collab(x, labels, step_at(i))
    (out.loss * collab.graph.loss_weight).backward()
    torch.nn.utils.clip_grad_norm_(collab.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if collab.objective.wants_holdout:
        holdout, holdout_labels = batch("shared", 1, seed=200 + i, size=8)
        collab.eval()
        with torch.no_grad():
            logits = collab.graph(holdout)
        collab.objective.end_epoch(logits, holdout_labels)


# ---------------------------------------------------------------------------- the checks

def check_declarations(case: Case, tmp_path: Path) -> None:
    """The graph suits the objective's declarations, and attach leaves the graph's state alone
    (an owned module hung on the graph would be exported and trained as the graph's)."""
    graph = fresh_graph(case)
    keys = list(graph.state_dict())
    objective = make_objective(case, graph, seed=0)
    assert list(graph.state_dict()) == keys, "attach changed the graph's state"
    assert graph.num_heads >= objective.min_heads
    roles = objective.head_roles(graph.num_heads)
    assert len(roles) == graph.num_heads and all(isinstance(r, str) for r in roles)
    assert objective.default_export in ("best", "last")
    assert set(objective.wants) <= set(probe(graph, objective.wants).features)


def parameters_cross_entropy_misses(graph: TrainingGraph, x: torch.Tensor,
                                    labels: torch.Tensor) -> set[str]:
    """The graph's parameters that plain per-head cross entropy leaves without a gradient on
    this batch: modules a graph with ``may_skip_modules`` skipped, which no objective reaches."""
    twin = copy.deepcopy(graph).train()
    torch.manual_seed(1000)
    logits = twin(x)
    cross_entropy_per_head(logits, labels.expand(*logits.shape[:2])).sum().backward()
    return {f"graph.{n}" for n, p in twin.named_parameters() if p.requires_grad and p.grad is None}


def check_gradients(case: Case, tmp_path: Path) -> None:
    """A finite loss, and a finite gradient to every trainable parameter, owned ones included."""
    collab, _, mode = setup(case)
    graph = collab.graph.train()
    x, labels = batch(mode, graph.num_heads, seed=0)
    torch.manual_seed(1000)
    out = collab(x, labels, step_at(0))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), out.loss
    assert out.per_head.shape == (graph.num_heads,) and torch.isfinite(out.per_head).all()
    assert all(torch.isfinite(v).all() for v in out.parts.values()), out.parts
    (out.loss * graph.loss_weight).backward()
    skipped = parameters_cross_entropy_misses(graph, x, labels) if graph.may_skip_modules \
        else set()
    trainable = [(n, p) for n, p in collab.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None and n not in skipped]
    assert not missing, f"{len(missing)} of {len(trainable)} parameters got no gradient, " \
                        f"e.g. {missing[:5]}"
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"


def check_state_round_trip(case: Case, tmp_path: Path) -> None:
    """A fresh objective loading a trained one's state_dict gives the identical loss."""
    collab, optimizer, mode = setup(case)
    sgd_step(collab, optimizer, mode, 0)  # owned state away from its initialisation
    graph, objective = collab.graph, collab.objective
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    twin = make_objective(case, graph, seed=7)
    with torch.no_grad():  # start elsewhere even where training left the state as it began
        for v in twin.state_dict().values():
            if v.is_floating_point():
                v.add_(0.5)
    twin.load_state_dict(state, strict=True)
    x, labels = batch(mode, graph.num_heads, seed=5)
    for training in (True, False):
        graph.train(training)
        torch.manual_seed(1005)
        with torch.no_grad():
            out = graph.run(x, wants=objective.wants)
        losses = []
        for obj in (objective.train(training), twin.train(training)):
            torch.manual_seed(1006)
            with torch.no_grad():
                losses.append(obj(out, labels, step_at(1), graph))
        a, b = losses
        mode_name = "train" if training else "eval"
        assert torch.equal(a.per_head, b.per_head), \
            f"{mode_name} mode: the loaded objective's loss differs: {b.per_head} vs {a.per_head}"
        assert a.parts.keys() == b.parts.keys()
        assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts), mode_name


def check_resume(case: Case, tmp_path: Path) -> None:
    """Two SGD steps straight equal one step, a checkpoint, fresh objects restored from it and
    one more step: every tensor and every momentum bit-equal."""
    straight, straight_opt, mode = setup(case)
    sgd_step(straight, straight_opt, mode, 0)
    sgd_step(straight, straight_opt, mode, 1)

    first, first_opt, _ = setup(case)
    sgd_step(first, first_opt, mode, 0)
    saved = checkpoint.save(tmp_path / str(case), 1, first.state_dict(),
                            {"optimizer": first_opt.state_dict()}, Progress(global_step=1), keep=1)
    del first, first_opt

    resumed, resumed_opt, _ = setup(case, seed=7)
    with torch.no_grad():  # the graph starts elsewhere too: only the checkpoint can align them
        for p in resumed.graph.parameters():
            p.add_(0.5)
    model_state, states, _ = checkpoint.load(saved)
    resumed.load_state_dict(model_state, strict=True)
    resumed_opt.load_state_dict(states["optimizer"])
    sgd_step(resumed, resumed_opt, mode, 1)

    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
    momenta_a, momenta_b = straight_opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert momenta_a.keys() == momenta_b.keys() and momenta_a
    assert all(torch.equal(momenta_a[i]["momentum_buffer"], momenta_b[i]["momentum_buffer"])
               for i in momenta_a)


def check_export(case: Case, tmp_path: Path) -> None:
    """Every head's export of the trained graph holds exactly its plain model's keys and none of
    the objective's."""
    collab, optimizer, mode = setup(case)
    sgd_step(collab, optimizer, mode, 0)
    graph, owned = collab.graph.eval(), set(collab.objective.state_dict())
    for h in range(graph.num_heads):
        path = cs.export(graph, head=h, path=tmp_path / f"{case}-head{h}.safetensors")
        exported = set(load_file(str(path)))
        plain = set(backbones.create(graph.head_spec(h)).state_dict())
        assert exported == plain, (h, sorted(exported ^ plain)[:5])
        assert not exported & owned and not any(k.startswith("objective.") for k in exported)


def mixed(labels: torch.Tensor, lam: float = 0.7) -> torch.Tensor:
    """Mixup's targets for integer ``labels`` (``[B]`` or ``[H, B]``): ``lam`` of each example's
    one-hot label and ``1 - lam`` of another class's, ``[..., C]``."""
    return lam * one_hot(labels, CLASSES).float() + \
        (1 - lam) * one_hot((labels + 1) % CLASSES, CLASSES).float()


def check_soft_targets(case: Case, tmp_path: Path) -> None:
    """An objective that takes soft targets (``soft_target_problem()`` None): one-hot targets
    ``[B, C]`` or ``[H, B, C]`` give the labels' loss and gradients (logits' and owned
    parameters'), mixed targets change the loss, and a mixed batch ``[B, C]`` or ``[H, B, C]``
    gives a finite loss and a finite gradient to every trainable parameter, non-zero wherever the
    labels' is. One that refuses them says why in one line, and its forward raises that as a
    UserError."""
    collab, _, mode = setup(case)
    graph, objective = collab.graph.train(), collab.objective
    h = graph.num_heads
    x, labels = batch(mode, h, seed=0)
    problem = objective.soft_target_problem()
    if problem is not None:
        assert isinstance(problem, str) and problem.strip() and "\n" not in problem, problem
        with pytest.raises(UserError, match=re.escape(problem)):
            collab(x, mixed(labels), step_at(0))
        return

    torch.manual_seed(1000)
    with torch.no_grad():
        out = graph.run(x, wants=objective.wants)
    owned = [p for p in objective.parameters() if p.requires_grad]

    def loss_and_gradients(targets: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = out.logits.detach().clone().requires_grad_()
        objective.zero_grad(set_to_none=True)
        torch.manual_seed(1001)
        result = objective(GraphOutput(logits, out.features), targets, step_at(0), graph)
        result.loss.backward()
        grads = [logits.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in owned]
        return torch.cat([result.loss.view(1), result.per_head]), grads

    hard, hard_grads = loss_and_gradients(labels)
    # a per-head copy [H, B, C] (equal rows unless each head has its own examples)
    hot = one_hot(labels, CLASSES).float()
    for targets in (hot, hot.expand(h, *labels.shape[-1:], CLASSES).clone()):
        soft, soft_grads = loss_and_gradients(targets)
        torch.testing.assert_close(soft, hard, atol=1e-6, rtol=1e-6)
        for a, b in zip(soft_grads, hard_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(loss_and_gradients(mixed(labels))[0], hard), \
        "mixed targets give the loss of their majority labels: the targets are not used"

    def step_gradients(x: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        collab.zero_grad(set_to_none=True)
        torch.manual_seed(1000)
        result = collab(x, targets, step_at(0))
        (result.loss * graph.loss_weight).backward()
        return result.loss, {n: p.grad for n, p in collab.named_parameters() if p.requires_grad}

    x_shared, shared = batch("shared", h, seed=0)
    batches = [(x_shared, mixed(shared))] + \
        ([(x, mixed(labels))] if labels.dim() == 2 else [(x, mixed(labels).repeat(h, 1, 1))])
    for x, targets in batches:
        majority = targets.argmax(-1)
        # a gradient that is zero in theory (a bias before BatchNorm) is rounding noise, which
        # may be exactly zero: such a parameter need not move unless the labels move it
        _, moved = step_gradients(x, majority)
        loss, grads = step_gradients(x, targets)
        assert torch.isfinite(loss), loss
        skipped = parameters_cross_entropy_misses(graph, x, majority) \
            if graph.may_skip_modules else set()
        bad = [n for n, g in grads.items() if n not in skipped and
               (g is None or not torch.isfinite(g).all()
                or (not g.any() and moved[n] is not None and bool(moved[n].any())))]
        assert not bad, f"targets {tuple(targets.shape)}: {len(bad)} of {len(grads)} " \
                        f"parameters got no finite non-zero gradient, e.g. {bad[:5]}"


CHECKS: tuple[Callable[[Case, Path], None], ...] = (
    check_declarations, check_gradients, check_state_round_trip, check_resume, check_export,
    check_soft_targets)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_registered_objective_keeps_the_contract_on_each_graph_kind_of_its_example(
        check: Callable[[Case, Path], None], case: Case, tmp_path: Path) -> None:
    check(case, tmp_path)


# ---------------------------------------------------------------------------- registration

class ToyBias(Objective):
    """Cross entropy of ``logits + b`` per head, with a learnt per-class bias ``b`` sized by the
    graph in ``attach``."""

    own_examples = True

    def __init__(self) -> None:
        super().__init__()
        self.bias: nn.Parameter | None = None

    def attach(self, graph: TrainingGraph) -> None:
        classes = probe(graph, ()).logits.shape[-1]
        if self.bias is None or self.bias.numel() != classes:
            self.bias = nn.Parameter(torch.randn(classes))

    def head_losses(self, logits: torch.Tensor, labels: torch.Tensor, context: LossContext
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = cross_entropy_per_head(logits + self.bias, labels)
        return ce, {"hard": ce}


class ToyIdleModule(ToyBias):
    """Breaks the protocol: owns a module no loss uses (it would stall distributed training)."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = nn.Linear(2, 2)


class ToyOnTheGraph(ToyBias):
    """Breaks the protocol: hangs its parameter on the graph, where an export would carry it."""

    def attach(self, graph: TrainingGraph) -> None:
        super().attach(graph)
        graph.register_parameter("toy_bias", self.bias)


class ToyHiddenState(ToyBias):
    """Breaks the protocol: keeps state that changes the loss in a plain attribute, which no
    checkpoint holds."""

    steps = 0

    def head_losses(self, logits: torch.Tensor, labels: torch.Tensor, context: LossContext
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.steps += 1
        per_head, parts = super().head_losses(logits * self.steps, labels, context)
        return per_head, parts


class ToyHardLabels(ToyBias):
    """Refuses soft targets, as an objective with a label term that has no soft form does."""

    def soft_target_problem(self) -> str | None:
        return "the toy's bias is indexed by the true class, which a mixed label does not have"


class ToyArgmax(ToyBias):
    """Breaks the protocol: claims soft targets but trains on their most likely class."""

    def head_losses(self, logits: torch.Tensor, labels: torch.Tensor, context: LossContext
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return super().head_losses(
            logits, labels.argmax(-1) if labels.is_floating_point() else labels, context)


class ToyLongRefusal(ToyHardLabels):
    """Breaks the protocol: its refusal is not one line."""

    def soft_target_problem(self) -> str | None:
        return "no soft targets:\nthe toy indexes its bias"


TOY_EXAMPLE = ObjectiveExample(kinds=("instances",), data="subsets")


@pytest.fixture
def register_toy() -> Iterator[Callable[[type[Objective]], str]]:
    """Registers toy objectives through the decorator; afterwards the registry is as before."""
    before = list(OBJECTIVES.items()), list(EXAMPLES.items())
    names: list[str] = []

    def register(cls: type[Objective]) -> str:
        names.append(f"toy_{cls.__name__.lower()}")
        register_objective(names[-1], example=TOY_EXAMPLE)(cls)
        return names[-1]
    yield register
    for name in names:
        del OBJECTIVES[name], EXAMPLES[name]
    assert (list(OBJECTIVES.items()), list(EXAMPLES.items())) == before


@pytest.mark.parametrize("toy", [ToyBias, ToyHardLabels], ids=["soft-targets", "hard-labels"])
def test_an_objective_is_covered_by_registering_it(register_toy, tmp_path, toy) -> None:
    name = register_toy(toy)
    assert cases_of([name]) == [Case(name, "instances")]
    for check in CHECKS:
        check(Case(name, "instances"), tmp_path)


@pytest.mark.parametrize("toy, check, match", [
    (ToyIdleModule, check_gradients, r"got no gradient, e\.g\. \['objective\.idle\.weight'"),
    (ToyOnTheGraph, check_declarations, "attach changed the graph's state"),
    (ToyHiddenState, check_state_round_trip, "train mode: the loaded objective's loss"),
    (ToyHiddenState, check_resume, "tensors differ"),
    (ToyArgmax, check_soft_targets, "the targets are not used"),
    (ToyLongRefusal, check_soft_targets, "no soft targets:"),
], ids=["idle-module", "module-on-the-graph", "hidden-state-round-trip", "hidden-state-resume",
        "soft-targets-unused", "refusal-of-two-lines"])
def test_the_checks_catch_a_toy_that_breaks_the_protocol(register_toy, tmp_path, toy, check,
                                                         match) -> None:
    with pytest.raises(AssertionError, match=match):
        check(Case(register_toy(toy), "instances"), tmp_path)


def test_a_name_registered_twice_is_a_value_error_and_the_first_registration_stands() -> None:
    example = EXAMPLES["dml"]
    with pytest.raises(ValueError, match="objective 'dml' is already registered"):
        register_objective("dml", example=ObjectiveExample())(ConsensusLoss)
    assert OBJECTIVES["dml"] is MutualLoss and EXAMPLES["dml"] is example


def test_a_bad_example_is_refused() -> None:
    with pytest.raises(ValueError, match="example data 'per_head'; valid: shared, views"):
        ObjectiveExample(data="per_head")
    with pytest.raises(ValueError, match=r"kinds \['routed'\] it does not train"):
        ObjectiveExample(kinds=("tree",), graph={"routed": lambda backbone, points: {}})
    with pytest.raises(TypeError, match="must be an ObjectiveExample"):
        register_objective("toy", example={"kinds": ["tree"]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'subsets' needs own_examples"):
        register_objective("toy", example=ObjectiveExample(data="subsets"))(ConsensusLoss)
    assert "toy" not in OBJECTIVES
