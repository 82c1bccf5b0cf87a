"""BYOT, self distillation (Zhang et al., ICCV 2019): the loss against a hand computation and
against the public reference implementation, what is detached (on parameter gradients), the exit
classifiers on ResNet, MobileNetV2, DenseNet and VGG stages with strict, equal exports, the
anytime table (each exit's accuracy and FLOPs) and a truncated export at an exit, bad input, and
a run through the engine: resumed bit-exactly and exported strictly.

The reference is luanyunteng/pytorch-be-your-own-teacher at
8045079f9933b3dd694dee5294faac0bd8d54fab (transcribed below with file and lines).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import collabsurgery as cs
from collabsurgery.cli import main
from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs import build_graph
from collabsurgery.measure.exits import (FULL, anytime, exit_accuracy, exit_features, exit_flops,
                                         run_with_objective)
from collabsurgery.models import backbones
from collabsurgery.objectives import SelfDistillationLoss, build_objective
from collabsurgery.objectives.base import LossContext, Step
from collabsurgery.objectives.self_distillation import ExitClassifier
from collabsurgery.train import engine

from helpers import (assert_close_scaled, assert_same_logits, assert_same_weights,
                     latest_weights, make_input, random_logits, ref_log_softmax, ref_softmax,
                     stop_then_resume)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


# ============================================================================ given outputs

class Given(nn.Module):
    """An exit classifier that returns fixed logits ``[B, C]`` and feature ``[B, D]`` (its
    parameters), whatever its input: the loss's gradients reach them as parameter gradients."""

    def __init__(self, logits: torch.Tensor, feature: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.feature = nn.Parameter(feature.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits, self.feature


def given_objective(exit_logits, exit_features, **kwargs) -> SelfDistillationLoss:
    """A BYOT objective whose exits ``e0, e1, ...`` return the given outputs; deepest 'deep'."""
    obj = SelfDistillationLoss(**kwargs)
    obj.exit_points = [f"e{i}" for i in range(len(exit_logits))]
    obj.deepest_point = "deep"
    obj.classifiers = nn.ModuleList(Given(z, f) for z, f in zip(exit_logits, exit_features))
    return obj


def run_given(obj: SelfDistillationLoss, logits: torch.Tensor, deep: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """The objective on deepest logits ``[B, C]`` and deepest feature ``[B, D, h, w]`` (leaf
    copies that require gradients); returns (loss, parts, logits leaf, feature leaf)."""
    logits = logits.clone().requires_grad_(True)
    deep = deep.clone().requires_grad_(True)
    features = {p: torch.zeros(1, len(labels), 1, 1, 1) for p in obj.exit_points}
    features["deep"] = deep.unsqueeze(0)
    per_head, parts = obj.head_losses(logits.unsqueeze(0), labels.unsqueeze(0),
                                      LossContext(features, Step()))
    return per_head.sum(), parts, logits, deep


def tiny_inputs(exits: int = 2, b: int = 3, c: int = 4, d: int = 5, seed: int = 0):
    """Deepest logits [B, C], exit logits [B, C] each, labels, exit features [B, D] and the
    deepest feature [B, D, 2, 2] (both signs)."""
    z, y = random_logits(h=exits + 1, b=b, c=c, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    features = [torch.randn(b, d, generator=g) for _ in range(exits)]
    deep = torch.randn(b, d, 2, 2, generator=g)
    return z[0], list(z[1:]), y, features, deep


# ============================================================================ (a) by hand

@pytest.mark.parametrize("alpha, weight, t, mask", [(0.1, 1e-2, 3.0, False), (0.4, 0.5, 2.0, True)])
def test_loss_and_parameter_gradients_match_a_hand_computation(alpha, weight, t, mask) -> None:
    """Loss, and the gradient of every given parameter and input, computed by hand in plain
    Python: the deepest logits get (1 - alpha) CE's gradient only and the deepest feature none
    (both are detached teachers); each exit's logits get (1 - alpha) CE's plus alpha T^2 KD's,
    its feature 2 lambda (F_i - pool(F_C)) (masked where both are <= 0 with ``mask``)."""
    z, exit_z, y, exit_f, deep = tiny_inputs()
    obj = given_objective(exit_z, exit_f, alpha=alpha, hint_weight=weight, temperature=t,
                          hint_mask=mask)
    loss, parts, z_leaf, deep_leaf = run_given(obj, z, deep, y)
    loss.backward()

    b, c, d = z.shape[0], z.shape[1], exit_f[0].shape[1]
    zs, ys = z.tolist(), y.tolist()
    teacher = [[sum(deep[i, j].flatten().tolist()) / 4 for j in range(d)] for i in range(b)]
    hard = -sum(ref_log_softmax(zs[i])[ys[i]] for i in range(b)) / b
    exits_hard = soft = hint = 0.0
    for zi, fi, given in zip(exit_z, exit_f, obj.classifiers):
        rows, feats = zi.tolist(), fi.tolist()
        grad_z, grad_f = [], []
        for i in range(b):
            q = ref_softmax(zs[i], t)
            p, p_t = ref_softmax(rows[i]), ref_softmax(rows[i], t)
            exits_hard -= ref_log_softmax(rows[i])[ys[i]] / b
            soft -= t * t * sum(qc * lp for qc, lp in zip(q, ref_log_softmax(rows[i], t))) / b
            grad_z.append([(1 - alpha) * (p[k] - (k == ys[i])) / b
                           + alpha * t * (p_t[k] - q[k]) / b for k in range(c)])
            on = [not mask or feats[i][j] > 0 or teacher[i][j] > 0 for j in range(d)]
            hint += sum((feats[i][j] - teacher[i][j]) ** 2 for j in range(d) if on[j])
            grad_f.append([2 * weight * (feats[i][j] - teacher[i][j]) * on[j] for j in range(d)])
        assert_close_scaled(given.logits.grad, torch.tensor(grad_z), "exit logits' gradient")
        assert_close_scaled(given.feature.grad, torch.tensor(grad_f), "exit feature's gradient")
    expected = (1 - alpha) * (hard + exits_hard) + alpha * soft + weight * hint
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["hard"].item() == pytest.approx(hard, rel=1e-5)
    assert parts["exits_hard"].item() == pytest.approx(exits_hard, rel=1e-5)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-5)
    assert parts["hint"].item() == pytest.approx(hint, rel=1e-5)
    deep_grad = [[(1 - alpha) * (ref_softmax(zs[i])[k] - (k == ys[i])) / b for k in range(c)]
                 for i in range(b)]
    assert_close_scaled(z_leaf.grad, torch.tensor(deep_grad), "deepest logits' gradient")
    assert deep_leaf.grad is None  # the hint's teacher is detached


def graph_and_objective(model: str = "cifar_resnet20", split=("layer1", "layer2", "layer3"),
                        size: int = 16, **kwargs):
    torch.manual_seed(0)
    graph = build_graph("tree", model, heads=1, split=list(split), input_size=(3, size, size),
                        execution="loop", model_kwargs={"num_classes": 10})
    objective = build_objective("byot", **kwargs)
    objective.attach(graph)
    return graph.train(), objective.train()


def test_the_deepest_stage_learns_from_the_labels_only() -> None:
    """On a ResNet-20 with exits after layer1 and layer2: every parameter of layer3 and of the
    classifier (after the last exit, so reached only through the teachers) gets exactly
    (1 - alpha) times plain CE's gradient, while layer2's get more (the exits train them)."""
    graph, objective = graph_and_objective(alpha=0.3, hint_weight=0.1)
    x, y = make_input(4, 16, seed=1), torch.arange(4)
    torch.manual_seed(5)
    objective(graph.run(x, wants=objective.wants), y).loss.backward()
    byot = {n: p.grad.clone() for n, p in graph.named_parameters()}
    graph.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    nn.functional.cross_entropy(graph(x)[0], y).backward()
    deep = [n for n in byot if ".layer3." in n or ".fc." in n]
    assert deep and all(torch.allclose(byot[n], 0.7 * p.grad, rtol=1e-4, atol=1e-7)
                        for n, p in graph.named_parameters() if n in deep)
    shallow = [n for n, p in graph.named_parameters() if ".layer2." in n and "weight" in n]
    assert any(not torch.allclose(byot[n], 0.7 * dict(graph.named_parameters())[n].grad,
                                  rtol=1e-2) for n in shallow)


# ============================================================================ (b) reference

def kd_loss_function(output, target_output, args):
    """luanyunteng/pytorch-be-your-own-teacher train.py lines 360-370, verbatim."""
    output = output / args.temperature
    output_log_softmax = torch.log_softmax(output, dim=1)
    loss_kd = -torch.mean(torch.sum(output_log_softmax * target_output, dim=1))
    return loss_kd


def feature_loss_function(fea, target_fea):
    """train.py lines 372-374, verbatim: squared difference where either is positive, summed."""
    loss = (fea - target_fea)**2 * ((fea > 0) | (target_fea > 0)).float()
    return torch.abs(loss).sum()


def reference_total_loss(output, middle_output1, middle_output2, middle_output3, final_fea,
                         middle1_fea, middle2_fea, middle3_fea, target, args):
    """train.py lines 196-228 (the training step's loss; meters left out)."""
    criterion = nn.CrossEntropyLoss()
    loss = criterion(output, target)
    middle1_loss = criterion(middle_output1, target)
    middle2_loss = criterion(middle_output2, target)
    middle3_loss = criterion(middle_output3, target)
    temp4 = output / args.temperature
    temp4 = torch.softmax(temp4, dim=1)
    loss1by4 = kd_loss_function(middle_output1, temp4.detach(), args) * (args.temperature**2)
    loss2by4 = kd_loss_function(middle_output2, temp4.detach(), args) * (args.temperature**2)
    loss3by4 = kd_loss_function(middle_output3, temp4.detach(), args) * (args.temperature**2)
    feature_loss_1 = feature_loss_function(middle1_fea, final_fea.detach())
    feature_loss_2 = feature_loss_function(middle2_fea, final_fea.detach())
    feature_loss_3 = feature_loss_function(middle3_fea, final_fea.detach())
    total_loss = (1 - args.alpha) * (loss + middle1_loss + middle2_loss + middle3_loss) + \
        args.alpha * (loss1by4 + loss2by4 + loss3by4) + \
        args.beta * (feature_loss_1 + feature_loss_2 + feature_loss_3)
    return total_loss


def branch_bottleneck(channel_in, channel_out, kernel_size):
    """models/resnet.py lines 11-25 (``branchBottleNeck``), verbatim."""
    middle_channel = channel_out // 4
    return nn.Sequential(
        nn.Conv2d(channel_in, middle_channel, kernel_size=1, stride=1),
        nn.BatchNorm2d(middle_channel),
        nn.ReLU(),
        nn.Conv2d(middle_channel, middle_channel, kernel_size=kernel_size, stride=kernel_size),
        nn.BatchNorm2d(middle_channel),
        nn.ReLU(),
        nn.Conv2d(middle_channel, channel_out, kernel_size=1, stride=1),
        nn.BatchNorm2d(channel_out),
        nn.ReLU(),
    )


def _compare_with_reference(alpha, beta, t, deep, mask):
    """Our loss with hint_mask=``mask`` and the reference's on the same three exits' logits and
    pooled features and the same deepest logits and pooled feature ``deep`` ``[B, D]``."""
    z, exit_z, y, exit_f, _ = tiny_inputs(exits=3, b=6, c=10, d=8, seed=3)
    obj = given_objective(exit_z, exit_f, alpha=alpha, hint_weight=beta, temperature=t,
                          hint_mask=mask)
    ours, _, our_z, our_deep = run_given(obj, z, deep.view(*deep.shape, 1, 1), y)
    ours.backward()
    ref_z = z.clone().requires_grad_(True)
    ref_deep = deep.view(*deep.shape, 1, 1).clone().requires_grad_(True)
    ref_exit_z = [e.clone().requires_grad_(True) for e in exit_z]
    ref_exit_f = [f.view(*f.shape, 1, 1).clone().requires_grad_(True) for f in exit_f]
    args = SimpleNamespace(temperature=t, alpha=alpha, beta=beta)
    theirs = reference_total_loss(ref_z, *ref_exit_z, ref_deep, *ref_exit_f, y, args)
    theirs.backward()
    return (ours, our_z, our_deep, obj), (theirs, ref_z, ref_deep, ref_exit_z, ref_exit_f)


@pytest.mark.parametrize("alpha, beta, t", [(0.1, 1e-6, 3.0), (0.5, 1e-2, 2.0), (0.3, 0.2, 1.0)])
def test_loss_and_gradients_equal_the_reference_code(alpha, beta, t) -> None:
    """hint_mask=True (the reference's form) on features of both signs: the loss and the
    gradients w.r.t. the deepest logits, every exit's logits and pooled features equal the
    reference's; the deepest feature gets none in either (detached)."""
    deep = torch.randn(6, 8, generator=torch.Generator().manual_seed(9))
    (ours, our_z, our_deep, obj), (theirs, ref_z, ref_deep, ref_z_i, ref_f_i) = \
        _compare_with_reference(alpha, beta, t, deep, mask=True)
    assert_close_scaled(ours, theirs, "loss", rtol=1e-5)
    assert_close_scaled(our_z.grad, ref_z.grad, "deepest logits' gradient", rtol=1e-5)
    for given, zi, fi in zip(obj.classifiers, ref_z_i, ref_f_i):
        assert_close_scaled(given.logits.grad, zi.grad, "exit logits' gradient", rtol=1e-5)
        assert_close_scaled(given.feature.grad, fi.grad.flatten(1), "exit feature's gradient",
                            rtol=1e-5)
    assert our_deep.grad is None and ref_deep.grad is None


def test_the_papers_hint_is_the_references_where_its_mask_is_all_ones() -> None:
    """hint_mask=False (the paper's ||F_i - F_C||^2, the default) equals the reference where the
    deepest feature is positive (its mask all ones: a ReLU output off zero) and differs where
    the mask drops terms."""
    positive = torch.rand(6, 8, generator=torch.Generator().manual_seed(9)) + 0.1
    (ours, *_), (theirs, *_) = _compare_with_reference(0.1, 0.05, 3.0, positive, mask=False)
    assert_close_scaled(ours, theirs, "loss", rtol=1e-5)
    negative = -positive
    (ours, *_), (theirs, *_) = _compare_with_reference(0.1, 0.05, 3.0, negative, mask=False)
    assert ours.item() > theirs.item() * (1 + 1e-3)


def test_exit_classifier_is_the_references_branch() -> None:
    """Our exit on a ResNet-18 layer2 feature (128 channels at 8x8 -> 512 at 4x4, kernel 4)
    with the reference's branch weights copied in: the same logits and pooled feature as
    models/resnet.py lines 129-131 and 189-193 (bottleneck, avgpool, flatten, middle_fc)."""
    torch.manual_seed(0)
    ours = ExitClassifier(128, 512, (4, 4), 100)
    bottleneck, fc = branch_bottleneck(128, 512, kernel_size=4), nn.Linear(512, 100)
    bottleneck.load_state_dict(ours.bottleneck.state_dict(), strict=True)
    fc.load_state_dict(ours.fc.state_dict(), strict=True)
    x = torch.randn(4, 128, 8, 8)
    logits, feature = ours(x)
    middle = nn.AdaptiveAvgPool2d((1, 1))(bottleneck(x))
    assert torch.equal(feature, middle.flatten(1))
    assert_close_scaled(logits, fc(torch.flatten(middle, 1)), "logits", rtol=1e-6)


# ============================================================================ (e) backbones

BACKBONES = [
    pytest.param("cifar_resnet20", ("layer1", "layer2", "layer3"), 16, [(4, 4), (2, 2)],
                 id="resnet20"),
    pytest.param("torchvision.mobilenet_v2", ("features.3", "features.6", "features.13",
                                              "features"), 32, [(8, 8), (4, 4), (2, 2)],
                 id="tv-mobilenetv2"),
    # VGG's stages end at the ReLU before each max pool; the deepest is the last one's (2x2)
    pytest.param("cifar_vgg11", ("features.6", "features.13", "features.20", "features.27"),
                 32, [(8, 8), (4, 4), (2, 2)], id="vgg11"),
    pytest.param("torchvision.densenet121", ("features.denseblock1", "features.denseblock2",
                                             "features.denseblock3", "features"), 32,
                 [(8, 8), (4, 4), (2, 2)], id="tv-densenet121", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model, split, size, kernels", BACKBONES)
def test_exits_on_a_backbones_stages_train_and_export_strictly_equal(
        model, split, size, kernels, tmp_path) -> None:
    """Exits at the stages (bottleneck kernels = each exit's downsampling to the deepest
    feature), a gradient to every parameter, one SGD step, then an export that loads strictly
    into the plain timm/torchvision model with the graph's eval logits."""
    graph, objective = graph_and_objective(model, split, size)
    assert objective.exit_points == list(split[:-1]) and objective.deepest_point == split[-1]
    assert [c.bottleneck[3].kernel_size for c in objective.classifiers] == kernels
    x, y = make_input(4, size, seed=2), torch.tensor([0, 1, 2, 3])
    out = objective(graph.run(x, wants=objective.wants), y)
    out.loss.backward()
    params = [*graph.named_parameters(), *objective.named_parameters()]
    assert not [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    torch.optim.SGD([p for _, p in params], lr=0.05).step()

    path = cs.export(graph, 0, tmp_path / "net.safetensors")
    plain = backbones.create(graph.head_spec(0))
    plain.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert_same_logits(plain.eval()(x), graph.eval()(x)[0])


# ============================================================================ anytime

def test_anytime_table_counts_each_exits_accuracy_and_flops() -> None:
    """exit_accuracy is the argmax of each exit's logits against the labels; the full
    network's FLOPs are the plain model's, each exit's are the stages up to it plus its
    classifier's, and the deeper exits cost more."""
    graph, objective = graph_and_objective()
    x, y = make_input(8, 16, seed=4), torch.arange(8) % 10
    accuracy = exit_accuracy(graph, objective, [(x[:5], y[:5]), (x[5:], y[5:])])
    with torch.no_grad():
        out = graph.eval().run(x, wants=objective.wants)
        logits = [z for z, _ in objective.eval().exit_outputs(out.features)] + [out.logits[0]]
    for name, z in zip([*objective.exit_points, FULL], logits):
        assert accuracy[name] == (z.argmax(-1) == y).float().mean().item()

    flops = exit_flops(graph, objective)
    plain = backbones.create(graph.head_spec(0)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plain(torch.zeros(1, 3, 16, 16))
    assert flops[FULL] == counter.get_total_flops()
    assert flops["layer1"] < flops["layer2"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        objective.classifiers[0](out.features["layer1"][0][:1])
    assert flops["layer1"] > counter.get_total_flops()
    rows = anytime(graph, objective, [(x, y)])
    assert [r["exit"] for r in rows] == ["layer1", "layer2", FULL]
    assert rows[-1]["flops_fraction"] == 1


def test_an_export_truncated_at_an_exit_gives_that_exits_feature(tmp_path) -> None:
    graph, _ = graph_and_objective()
    path = cs.export(graph.eval(), 0, tmp_path / "net.safetensors")
    x = make_input(2, 16, seed=6)
    (feature,) = exit_features(path, "layer2")(x)
    with torch.no_grad():
        assert_same_logits(feature, graph.run(x, wants=["layer2"]).features["layer2"][0])
    with pytest.raises(UserError, match="exit 'layer9' is not a feature level.*valid: .*layer1"):
        exit_features(path, "layer9")


# ============================================================================ bad input

@pytest.mark.parametrize("model, split, size, kwargs, match", [
    ("cifar_resnet20", ["layer1", "layer2", "layer3"], 16, {"exits": ["layer9"]},
     (r"byot exit 'layer9' is not a split point of the graph before its deepest feature "
      r"'layer3'; valid: layer1, layer2")),
    ("cifar_resnet20", ["layer1", "layer2", "layer3"], 16, {"exits": ["layer3"]},
     r"valid: layer1, layer2"),
    ("cifar_resnet20", ["layer1", "layer2"], 16, {"deepest": "layer3"},
     r"deepest feature 'layer3' is not a split point of the graph; valid: layer1, layer2"),
    ("cifar_resnet20", ["layer3"], 16, {}, r"at least one exit before its deepest feature"),
    ("cifar_vgg11", ["features.13", "global_pool", "classifier.3"], 32, {},
     r"byot exit 'global_pool' gives \(512,\), not a spatial feature map"),
])
def test_bad_exits_are_one_line_user_errors_naming_what_is_valid(model, split, size, kwargs,
                                                                 match) -> None:
    graph = build_graph("tree", model, heads=1, split=split, input_size=(3, size, size))
    with pytest.raises(UserError, match=match) as err:
        build_objective("byot", **kwargs).attach(graph)
    assert "\n" not in str(err.value)


def test_byot_needs_one_head_with_split_points() -> None:
    with pytest.raises(UserError, match="use pattern tree with heads: 1, got 2 heads"):
        build_objective("byot").check_compatible(2, 10)
    with pytest.raises(UserError, match=r"split: \[<exits>..., <deepest>\]"):
        build_objective("byot").attach(build_graph("tree", "cifar_resnet20", heads=1,
                                                   input_size=(3, 16, 16)))
    for bad, match in (({"alpha": 1.5}, "alpha"), ({"hint_weight": -1}, "hint_weight"),
                       ({"temperature": 0}, "temperature")):
        with pytest.raises(UserError, match=match):
            build_objective("byot", **bad)


# ============================================================================ recipes and runs

def test_demo_and_paper_recipes_build_their_graph_and_objective() -> None:
    demo = load_recipe(REPO / "recipes" / "demo-byot.yaml")
    assert demo.objective.name == "byot" and demo.graph.args["heads"] == 1
    paper = load_recipe(REPO / "recipes" / "cifar100-resnet18-byot.yaml")
    t = paper.train
    assert (t.epochs, t.batch_size, t.lr, t.milestones, t.gamma, t.weight_decay, t.nesterov) == \
        (200, 128, 0.1, [75, 130, 180], 0.1, 5e-4, False)
    assert {k: paper.objective.args[k] for k in ("alpha", "hint_weight", "temperature")} == \
        {"alpha": 0.1, "hint_weight": 1e-6, "temperature": 3.0}
    graph = build_graph(paper.graph.pattern, paper.model.name, input_size=(3, 32, 32),
                        model_kwargs={"num_classes": 100}, **paper.graph.args)
    objective = build_objective("byot", **paper.objective.args)
    objective.attach(graph)
    # the reference's branches on ResNet-18: kernels 8, 4, 2 into layer4's 512 channels
    assert [c.bottleneck[3].kernel_size for c in objective.classifiers] == [(8, 8), (4, 4),
                                                                           (2, 2)]
    assert all(c.fc.in_features == 512 and c.fc.out_features == 100
               for c in objective.classifiers)


@pytest.mark.slow
def test_a_run_resumes_bit_exactly_exports_strictly_and_tables_its_exits(tmp_path,
                                                                          capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(REPO / "recipes" / "demo-byot.yaml", [
            "data.max_train_examples=64", "train.batch_size=16", "train.epochs=2",
            "run.progress=false", f"run.dir={tmp_path}", f"run.name={name}", *more])

    straight = engine.train(recipe("straight"))
    stop_then_resume(lambda *more: recipe("resumed", *more), tmp_path / "resumed", 6, capsys)
    a, b = (latest_weights(d) for d in (straight, tmp_path / "resumed"))
    assert any(k.startswith("objective.classifiers.") for k in a)  # the exits are checkpointed
    assert_same_weights(a, b)

    out = tmp_path / "net.safetensors"
    assert main(["export", str(straight), "-o", str(out)]) == 0
    plain = timm.create_model("cifar_resnet20", num_classes=10)
    plain.load_state_dict(load_file(str(out)), strict=True)
    graph, _ = load_run(straight)
    x = make_input(3, 16, seed=2)
    with torch.no_grad():
        assert_same_logits(plain.eval()(x), graph(x)[0])

    graph, objective = run_with_objective(straight)
    assert torch.equal(objective.classifiers[0].fc.weight, a["objective.classifiers.0.fc.weight"])
    capsys.readouterr()
    assert main(["evaluate", str(straight), "--exits"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("layer1", "layer2", "full network", "MFLOPs"))


def test_cli_bad_byot_input_is_one_line_exit_2(tmp_path, capsys) -> None:
    code = main(["train", "--recipe", str(REPO / "recipes" / "demo-byot.yaml"),
                 f"run.dir={tmp_path}", "objective.exits=[layer1, layer7]"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "byot exit 'layer7'" in err and "valid: layer1" in err
    assert not any(tmp_path.iterdir())
