"""DML and offline KD against hand computations (plain Python loops), teacher loading, and both
objectives through the engine and the CLI on the built-in digits (16 px, 128 examples)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.config.recipe import load_recipe, save_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.from_run import export_from_source, load_run
from collabsurgery.export.teacher import load_teacher
from collabsurgery.graphs import GraphOutput
from collabsurgery.objectives import DistillationLoss, MutualLoss, build_objective
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine
from collabsurgery.train.engine import make_objective

from helpers import assert_same_logits, random_logits, ref_kl, ref_log_softmax, ref_softmax

REPO = Path(__file__).resolve().parents[1]
SIZE = (3, 16, 16)
TINY = ["data.image_size=16", "data.max_train_examples=128", "train.batch_size=16",
        "model.name=cifar_resnet20", "run.progress=false", "train.epochs=1"]

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


# ---------------------------------------------------------------------------- DML

def ref_dml(logits: torch.Tensor, labels: torch.Tensor, t: float) -> list[tuple[float, float]]:
    """Per student (hard, mimicry) of DML with plain Python loops."""
    z = logits.double().tolist()
    y = labels.expand(logits.shape[:2]).tolist()
    k_n, b_n = len(z), len(z[0])
    out = []
    for k in range(k_n):
        hard = sum(-ref_log_softmax(z[k][b])[y[k][b]] for b in range(b_n)) / b_n
        mimicry = 0.0
        for j in range(k_n):
            if j != k:
                mimicry += sum(ref_kl(ref_softmax(z[j][b], t), ref_log_softmax(z[k][b], t))
                               for b in range(b_n)) / b_n
        out.append((hard, t * t * mimicry / (k_n - 1)))
    return out


@pytest.mark.parametrize("t,per_head_labels", [(1.0, False), (2.0, False), (1.0, True)])
def test_dml_matches_loop_reference(t: float, per_head_labels: bool) -> None:
    z, y = random_logits(h=3, b=4, c=5)
    if per_head_labels:
        y = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(3))
    out = MutualLoss(temperature=t)(z, y)
    ref = ref_dml(z, y, t)
    torch.testing.assert_close(out.per_head, torch.tensor([h + m for h, m in ref]))
    torch.testing.assert_close(out.parts["hard"], torch.tensor(sum(h for h, _ in ref)))
    torch.testing.assert_close(out.parts["mimicry"], torch.tensor(sum(m for _, m in ref)))
    torch.testing.assert_close(out.loss, out.per_head.sum())
    assert out.loss.dim() == 0 and not out.per_head.requires_grad


def test_dml_divides_by_k_minus_1() -> None:
    # students 1 and 2 are identical: student 0's mimicry is the MEAN of two equal KLs
    z = torch.tensor([[[1.0, 0.0, -1.0]], [[0.0, 2.0, 0.0]], [[0.0, 2.0, 0.0]]])
    y = torch.tensor([0])
    parts = MutualLoss().head_losses(z, y.expand(3, 1), None)[1]
    kl_a_b = ref_kl(ref_softmax([0.0, 2.0, 0.0]), ref_log_softmax([1.0, 0.0, -1.0]))
    kl_b_a = ref_kl(ref_softmax([1.0, 0.0, -1.0]), ref_log_softmax([0.0, 2.0, 0.0]))
    expected = torch.tensor([kl_a_b, kl_b_a / 2, kl_b_a / 2])  # KL(p_2 || p_1) = 0
    torch.testing.assert_close(parts["mimicry"], expected)
    # K = 2 is the paper's two-network loss: L_1 = CE + KL(p_2 || p_1), no division
    two = MutualLoss().head_losses(z[:2], y.expand(2, 1), None)[1]["mimicry"]
    torch.testing.assert_close(two, torch.tensor([kl_a_b, kl_b_a]))


def test_dml_gradient_hand_formula_targets_detached() -> None:
    z, y = random_logits(h=3, b=4, c=5, seed=1)
    t, (k_n, b_n, c) = 2.0, z.shape
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(MutualLoss(t)(zg, y).loss, zg)
    onehot = F.one_hot(y, c).float()
    expected = torch.empty_like(z)
    for k in range(k_n):
        hard = (torch.softmax(z[k], -1) - onehot) / b_n
        # d/dz_k of T^2 KL(p_j || softmax(z_k/T)) = T (softmax(z_k/T) - p_j), p_j constant
        soft = sum(torch.softmax(z[k] / t, -1) - torch.softmax(z[j] / t, -1)
                   for j in range(k_n) if j != k)
        expected[k] = hard + t * soft / ((k_n - 1) * b_n)
    torch.testing.assert_close(g, expected)
    # student k's loss moves only z_k: the other students' distributions are targets
    for k in range(k_n):
        zg = z.clone().requires_grad_(True)
        per_head, _ = MutualLoss(t).head_losses(zg, y.expand(k_n, b_n), None)
        (gk,) = torch.autograd.grad(per_head[k], zg)
        others = [j for j in range(k_n) if j != k]
        assert torch.count_nonzero(gk[others]) == 0 and torch.count_nonzero(gk[k]) > 0


def test_dml_bad_input() -> None:
    z, y = random_logits(h=1)
    with pytest.raises(UserError, match="at least 2 heads"):
        MutualLoss()(z, y)
    for bad in (0.0, -1.0, float("nan"), "1", True):
        with pytest.raises(UserError, match="temperature must be a number > 0"):
            MutualLoss(temperature=bad)
    assert isinstance(build_objective("dml", temperature=1.0), MutualLoss)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = MutualLoss()(random_logits()[0].bfloat16(), random_logits()[1])
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------- KD: the loss

def _linear_teacher(d: int = 4, c: int = 5) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(d, c)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(c, d, generator=g))
        lin.bias.copy_(torch.randn(c, generator=g))
    return lin


def ref_kd(x: list, w: list, bias: list, z: torch.Tensor, y: torch.Tensor, t: float,
           alpha: float) -> list[float]:
    """Per head KD loss with loops; ``x[h][b]`` is head h's input for example b."""
    zl, yl = z.double().tolist(), y.tolist()
    out = []
    for h in range(len(zl)):
        soft = hard = 0.0
        for b in range(len(zl[h])):
            tb = [sum(wi * xi for wi, xi in zip(w[c], x[h][b])) + bias[c] for c in range(len(w))]
            soft += ref_kl(ref_softmax(tb, t), ref_log_softmax(zl[h][b], t))
            hard += -ref_log_softmax(zl[h][b])[yl[b]]
        b_n = len(zl[h])
        out.append(alpha * t * t * soft / b_n + (1 - alpha) * hard / b_n)
    return out


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("t,alpha", [(4.0, 0.9), (1.0, 0.5), (2.0, 1.0)])
def test_kd_matches_loop_reference(per_head: bool, t: float, alpha: float) -> None:
    lin = _linear_teacher()
    calls: list[tuple[int, ...]] = []
    lin.register_forward_hook(lambda _m, inputs, _o: calls.append(tuple(inputs[0].shape)))
    z, y = random_logits(h=2, b=3, c=5)
    g = torch.Generator().manual_seed(5)
    if per_head:
        x = torch.randn(2, 3, 4, generator=g)
    else:
        x = torch.randn(3, 4, generator=g).expand(2, 3, 4)  # as a graph gives a shared batch
    obj = DistillationLoss(lin, temperature=t, alpha=alpha)
    zg = z.clone().requires_grad_(True)
    out = obj(GraphOutput(zg, {"input": x}), y)
    ref = ref_kd(x.tolist(), lin.weight.tolist(), lin.bias.tolist(), z, y, t, alpha)
    torch.testing.assert_close(out.per_head, torch.tensor(ref))
    torch.testing.assert_close(alpha * out.parts["soft"] + (1 - alpha) * out.parts["hard"],
                               out.loss.detach())
    # the teacher ran once on the shared batch, on all H x B examples otherwise
    assert calls == ([(6, 4)] if per_head else [(3, 4)])
    out.loss.backward()
    assert zg.grad is not None and lin.weight.grad is None and lin.bias.grad is None


def test_kd_shared_equals_materialised_copies() -> None:
    lin = _linear_teacher()
    z, y = random_logits(h=3, b=4, c=5)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    obj = DistillationLoss(lin)
    shared = obj(GraphOutput(z, {"input": x.expand(3, 4, 4)}), y).per_head
    copies = obj(GraphOutput(z, {"input": x.expand(3, 4, 4).clone()}), y).per_head
    torch.testing.assert_close(shared, copies)


def test_kd_teacher_is_not_a_submodule_and_stays_eval() -> None:
    teacher = torch.nn.Sequential(_linear_teacher(), torch.nn.Dropout(0.5))
    obj = DistillationLoss(teacher)
    assert obj.state_dict() == {} and list(obj.parameters()) == [] and list(obj.children()) == []
    assert all(not p.requires_grad for p in teacher.parameters())
    obj.train()
    assert obj.training and not any(m.training for m in teacher.modules())
    x = torch.randn(2, 8, 4).expand(2, 8, 4)
    assert torch.equal(obj.teacher_logits(x), obj.teacher_logits(x))  # no dropout
    # inside the module the engine prepares, checkpoints and optimises: only the graph
    graph = cs.wrap("cifar_resnet20", split="layer1", heads=2, num_classes=10, input_size=SIZE)
    collab = engine.Collaboration(graph, obj)
    assert set(collab.state_dict()) == {f"graph.{k}" for k in graph.state_dict()}
    assert sum(1 for _ in collab.parameters()) == sum(1 for _ in graph.parameters())
    collab.train()
    assert not any(m.training for m in teacher.modules())
    # the teacher follows the input to its device on first use (meta stands in for a GPU)
    lin = _linear_teacher()
    assert DistillationLoss(lin).teacher_logits(torch.zeros(2, 3, 4, device="meta")).is_meta
    assert lin.weight.is_meta


# ---------------------------------------------------------------------------- KD: teachers

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Head 1 of a 2-head cifar_resnet20 tree, exported; and the graph it came from."""
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, num_classes=10, input_size=SIZE)
    path = cs.export(net, head=1, path=tmp_path_factory.mktemp("export") / "t.safetensors")
    return path, net.eval()


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A finished one-epoch 2-head run on the digits (with hold-out metrics)."""
    root = tmp_path_factory.mktemp("teacher")
    return engine.train(load_recipe(None, [*TINY, "graph.heads=2", "graph.split=[layer1]",
                                           f"run.dir={root}", "run.name=teacher"]))


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_teacher_from_export(exported) -> None:
    path, net = exported
    obj = DistillationLoss(load_teacher(str(path)))
    x = _images()
    with torch.no_grad():
        expected = net(x[0])[1]
    torch.testing.assert_close(obj.teacher_logits(x[0].expand(2, *x[0].shape))[1], expected)
    obj.check_compatible(2, 10)
    with pytest.raises(UserError, match="predicts 10 classes but the students predict 7"):
        obj.check_compatible(2, 7)


@pytest.mark.slow
def test_teacher_from_run_directory(teacher_run) -> None:
    graph, history = load_run(teacher_run)
    best = history[-1]["holdout"]["best_head"]
    x = _images(1)
    with torch.no_grad():
        expected = graph(x[0])
    assert not torch.allclose(expected[0], expected[1])  # so the head chosen matters
    for head, kwargs in ((best, {}), (0, {"teacher_head": 0}), (1, {"teacher_head": 1})):
        obj = DistillationLoss(load_teacher(str(teacher_run), **kwargs))
        got = obj.teacher_logits(x[0].expand(2, *x[0].shape))[0]
        assert_same_logits(got, expected[head])
    with pytest.raises(UserError, match=r"teacher_head must be a head of the teacher run, got 2; "
                                        r"valid: 0\.\.1"):
        load_teacher(str(teacher_run), teacher_head=2)


def test_teacher_from_model_name_and_weights(tmp_path) -> None:
    model = timm.create_model("cifar_resnet20", num_classes=10).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    obj = DistillationLoss(load_teacher("cifar_resnet20", teacher_weights=str(weights),
                                        teacher_kwargs={"num_classes": 10}))
    x = _images(2)
    with torch.no_grad():
        assert_same_logits(obj.teacher_logits(x), torch.stack([model(x[0]), model(x[1])]))
    # a torchvision teacher has no num_classes attribute: its class count comes from a probe
    tv = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10)
    tv_weights = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tv_weights))
    tv_obj = DistillationLoss(load_teacher("torchvision.mobilenet_v3_small",
                                           teacher_weights=str(tv_weights),
                                           teacher_kwargs={"num_classes": 10}))
    tv_obj.check_compatible(1, 10)
    with pytest.raises(UserError, match="predicts 10 classes but the students predict 5"):
        tv_obj.check_compatible(1, 5)
    # weights of another shape: one line naming the file
    with pytest.raises(UserError, match="do not fit cifar_resnet20"):
        load_teacher("cifar_resnet20", teacher_weights=str(weights),
                     teacher_kwargs={"num_classes": 7})


def test_class_count_without_known_num_classes_checked_on_first_batch() -> None:
    lin = _linear_teacher(4, 5)
    calls: list[int] = []
    lin.register_forward_pre_hook(lambda _m, _i: calls.append(1))
    obj = DistillationLoss(lin)  # a probe on images fails for a Linear
    obj.check_compatible(1, 3)
    obj.check_compatible(1, 3)
    assert len(calls) == 1  # probed once, not at every step's check
    z, y = random_logits(h=1, b=2, c=3)
    with pytest.raises(UserError, match="gives 5 classes, the students 3"):
        obj(GraphOutput(z, {"input": torch.zeros(2, 4).expand(1, 2, 4)}), y)


def _plain_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    return path


@pytest.mark.parametrize("args, match", [
    ({"teacher": "/no/such/teacher.safetensors"}, "objective.teacher' names no existing file or directory"),
    ({"teacher": "runs/no-such-run"}, "objective.teacher' names no existing file or directory"),
    ({"teacher": "PLAIN"}, "no format=collabsurgery.backbone/1 metadata"),
    ({"teacher": "TEXT"}, "not a readable safetensors file"),
    ({"teacher": "EMPTYDIR"}, "not a training run"),
    ({"teacher": "EXPORT", "teacher_weights": "PLAIN"}, "objective.teacher_weights' applies only"),
    ({"teacher": "EXPORT", "teacher_kwargs": {"num_classes": 10}},
     "objective.teacher_kwargs' applies only"),
    ({"teacher": "EXPORT", "teacher_head": 0}, "objective.teacher_head' applies only"),
    ({"teacher": "cifar_resnet20"}, "objective.teacher_weights' is missing: teacher 'cifar_resnet20' is a"),
    ({"teacher": "cifar_resnet20", "teacher_kwargs": {"num_classes": 10}},
     "objective.teacher_weights' is missing"),
    ({"teacher": "cifar_resnet20", "teacher_weights": "/no/such.safetensors"},
     "objective.teacher_weights' names no existing file"),
    ({"teacher": "cifar_resnet20", "teacher_weights": "TEXT"}, "truncated or corrupt"),
    ({"teacher": "resnet_nope", "teacher_weights": "PLAIN"}, "unknown model 'resnet_nope'"),
    ({"teacher": "nothing_at_all"}, "objective.teacher' must be an existing file or directory or a model"),
    ({"teacher": 5}, "objective.teacher' must be a path or a model name"),
    ({"teacher": "EXPORT", "temperature": 0}, "objective.temperature' must be a number > 0"),
    ({"teacher": "EXPORT", "alpha": 1.5}, r"objective.alpha' must be a number in \[0, 1\]"),
    ({"teacher": "EXPORT", "temperature": "warm"}, "objective.temperature' must be a number > 0, got 'warm'"),
])
def test_kd_bad_teacher_is_one_line_user_error(tmp_path, exported, args, match) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    (tmp_path / "empty").mkdir()
    names = {"PLAIN": str(_plain_safetensors(tmp_path)), "TEXT": str(text),
             "EMPTYDIR": str(tmp_path / "empty"), "EXPORT": str(exported[0])}
    args = {k: names.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(UserError, match=match) as err:
        make_objective("kd", args)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- engine and CLI

@pytest.mark.slow
def test_kd_trains_from_a_run_through_the_cli(teacher_run, tmp_path, capsys) -> None:
    recipe = load_recipe(None, [*TINY, "graph.heads=1", "graph.split=[]", "name=student",
                                f"run.dir={tmp_path / 'runs'}",
                                f"objective={{name: kd, teacher: {teacher_run}, alpha: 0.9}}"])
    recipe_file = save_recipe(recipe, tmp_path / "kd.yaml")
    assert cli.main(["train", "--recipe", str(recipe_file), "train.max_steps=3"]) == 0
    run_dir = tmp_path / "runs" / "student"
    state = load_file(str(checkpoint.latest(run_dir / "checkpoints") / "model.safetensors"))
    student = timm.create_model("cifar_resnet20", num_classes=10)
    # graph + objective were checkpointed, and the teacher is not part of either
    assert set(state) == {f"graph.{k}" for k in engine.build_net(recipe, 10).state_dict()}
    path, _ = export_from_source(run_dir, "0", tmp_path / "student.safetensors")
    assert set(load_file(str(path))) == set(student.state_dict())


@pytest.mark.slow
def test_dml_trains_a_peer_group(tmp_path) -> None:
    recipe = load_recipe(None, [*TINY, "graph={pattern: peers}",
                                "model.name=[cifar_resnet20, cifar_resnet20]",
                                "objective.name=dml", "objective.temperature=1",
                                "train.max_steps=2", f"run.dir={tmp_path}", "run.name=dml"])
    run_dir = engine.train(recipe)
    assert checkpoint.latest(run_dir / "checkpoints").name == "ckpt-00000002"
    graph, _ = load_run(run_dir)
    assert graph.num_heads == 2


@pytest.mark.parametrize("objective, named", [
    ("{name: kd, teacher: /no/such/teacher.safetensors}",
     "recipe key 'objective.teacher' names no existing file or directory"),
    ("{name: kd, teacher: EXPORT3}", "predicts 3 classes but the students predict 10"),
    ("{name: kd, teacher: EXPORT3, teacher_weights: EXPORT3}",
     "recipe key 'objective.teacher_weights' applies only"),
    ("{name: kd, teacher: cifar_resnet20}", "recipe key 'objective.teacher_weights' is missing"),
    ("{name: kd, teacher: EXPORT3, alpha: 2}",
     "recipe key 'objective.alpha' must be a number in [0, 1]"),
    ("{name: dml, temperature: warm}", "recipe key 'objective.temperature' must be a number"),
    ("{name: kd}", "teacher"),
    ("{name: dml}", "at least 2 heads"),
])
def test_bad_objective_through_cli_is_one_line_exit_2(tmp_path, capsys, objective, named):
    export3 = cs.export(cs.wrap("cifar_resnet20", split="layer1", heads=2, num_classes=3,
                                input_size=SIZE), head=0, path=tmp_path / "three.safetensors")
    recipe = load_recipe(None, [*TINY, "graph.heads=1", "graph.split=[]",
                                f"run.dir={tmp_path / 'runs'}"])
    recipe_file = save_recipe(recipe, tmp_path / "r.yaml")
    override = f"objective={objective.replace('EXPORT3', str(export3))}"
    code = cli.main(["train", "--recipe", str(recipe_file), override])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("collabsurgery: error: ") and named in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # found before anything is written


@pytest.mark.parametrize("name, objective", [
    ("demo-dml", "dml"), ("demo-kd", "kd"), ("cifar100-resnet32-dml", "dml"),
    ("cifar100-resnet110-to-resnet32-kd", "kd"),
])
def test_recipes_load(name: str, objective: str) -> None:
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.name == name and recipe.objective.name == objective
