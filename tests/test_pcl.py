"""PCL (Peer Collaborative Learning, Wu & Gong, AAAI 2021): the loss by hand and against the
public reproduction's code, what is detached where (on parameter gradients), the tree that runs
each peer on its own view, the recipe defaults, and end to end: resume bit-exact with the
temporal means (EMA) and the export of the best peer's EMA weights.

The reference transcribed below: shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-
Distillation at commit 6afb4730bc5a35a11f7a0097ef94d0d17d3b6772,

- ``src/losses/kd_loss.py`` lines 8-41 (``KDLoss``, ``PMLoss``),
- ``src/losses/loss_wrapper.py`` lines 18-22 (``compute_rampup_weight``) and 37-61 (the loss),
- ``src/controller.py`` line 42 (what the loss gets: ``en_output.detach()`` as the ensemble
  target, the mean model's outputs, detached by ``src/models/resnet.py`` lines 215-216),
- ``src/models/resnet.py`` lines 161 and 218-219 (the fusion: ``en_fc`` on the concatenated
  pooled features).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from collabsurgery import cli
from collabsurgery.config.recipe import data_arguments, load_recipe
from collabsurgery.data.datasets import load_splits
from collabsurgery.errors import UserError
from collabsurgery.graphs import build_graph, rebuild
from collabsurgery.graphs.base import INPUT
from collabsurgery.graphs.saving import config_from_json
from collabsurgery.objectives import build_objective
from collabsurgery.objectives.base import LossContext, Step, sigmoid_rampup
from collabsurgery.objectives.peer_collaborative import PeerCollaborativeLoss
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import (assert_close_scaled, assert_same_logits, assert_same_weights,
                     latest_weights, random_logits, stop_then_resume, tiny_recipe)

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")
REPO = Path(__file__).resolve().parents[1]


# ============================================================================ the reference

class ReferenceKDLoss(nn.Module):
    """kd_loss.py lines 8-26, ``KDLoss``: batchmean KL at T, times T^2 (the target as given)."""

    def __init__(self, temperature=3.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.func = nn.KLDivLoss(reduction='batchmean')

    def forward(self, pred, target):
        loss = self.func(F.log_softmax(pred / self.temperature, dim=1),
                         F.softmax(target / self.temperature, dim=1)) \
            * self.temperature * self.temperature
        return loss


class ReferencePMLoss(nn.Module):
    """kd_loss.py lines 29-41, ``PMLoss``: the mean over the other peers' mean outputs of the
    KL to each (each detached)."""

    def __init__(self, temperature=3.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.kd = ReferenceKDLoss(temperature=self.temperature)

    def forward(self, pred, targets):
        loss = 0
        for i in range(len(targets)):
            target = targets[i].detach()
            pmloss = self.kd(pred, target)
            loss += pmloss
        return loss / len(targets)


def reference_rampup_weight(epoch, lambd=1.0, alpha=80):
    """loss_wrapper.py lines 18-22, ``compute_rampup_weight``, as written (``epoch / lambd``:
    a slip for ``epoch / alpha``, see PeerCollaborativeLoss's docstring)."""
    if epoch > alpha:
        return lambd
    else:
        return lambd * math.exp(-5 * (1 - epoch / lambd) ** 2)


def reference_pcl_loss(preds, targets, epoch):
    """loss_wrapper.py lines 37-61 (``LossWrapper.forward`` in training, ``ema=False``), with
    ``ce, kd, pm`` = CrossEntropyLoss, KDLoss(T=3), PMLoss(T=3), as ``main.py`` builds them."""
    ce, kd, pm = nn.CrossEntropyLoss(), ReferenceKDLoss(), ReferencePMLoss()
    en_label, mean_label1, mean_label2, mean_label3, label = targets
    pred1, pred2, pred3, pred_en = preds

    loss = ce(pred_en, label)
    rampup_weight = reference_rampup_weight(epoch)

    # model1
    loss_ce = ce(pred1, label)
    loss_pe = kd(pred1, en_label) * rampup_weight
    loss_pm = pm(pred1, [mean_label2, mean_label3]) * rampup_weight
    loss1 = loss_ce + loss_pe + loss_pm
    # model2
    loss_ce = ce(pred2, label)
    loss_pe = kd(pred2, en_label) * rampup_weight
    loss_pm = pm(pred2, [mean_label1, mean_label3]) * rampup_weight
    loss2 = loss_ce + loss_pe + loss_pm
    # model3
    loss_ce = ce(pred3, label)
    loss_pe = kd(pred3, en_label) * rampup_weight
    loss_pm = pm(pred3, [mean_label1, mean_label2]) * rampup_weight
    loss3 = loss_ce + loss_pe + loss_pm

    loss += loss1 + loss2 + loss3
    return loss


class Fixed(nn.Module):
    """A stand-in temporal mean: the given logits ``[m, B, C]`` whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def objective_with_fusion(m: int, d: int, c: int, t: float = 3.0, rampup: float = 80.0,
                          seed: int = 1) -> PeerCollaborativeLoss:
    """PCL reading feature ``"feat"``, with a seeded fusion classifier ``Linear(m d, c)``."""
    obj = PeerCollaborativeLoss(temperature=t, rampup_epochs=rampup, feature="feat")
    obj.wants = (INPUT, "feat")
    torch.manual_seed(seed)
    obj.fusion = nn.Linear(m * d, c)
    return obj


@pytest.mark.parametrize("epoch", [0, 100])  # where the code's ramp-up and the paper's agree
def test_pcl_loss_and_gradients_equal_the_reference_code(epoch):
    """Loss, and gradients w.r.t. the peers' logits, their pooled features and the fusion
    classifier, against the transcription, on identical logits (3 peers, as the code has)."""
    m, b, c, d = 3, 6, 10, 8
    logits, labels = random_logits(h=m, b=b, c=c, seed=0)
    mean_logits, _ = random_logits(h=m, b=b, c=c, seed=1)
    features = torch.randn(m, b, d, generator=torch.Generator().manual_seed(2))
    obj = objective_with_fusion(m, d, c)

    ours_z, ours_f = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
    context = LossContext({INPUT: torch.zeros(m, b, 1), "feat": ours_f}, Step(epoch=epoch),
                          temporal_mean=Fixed(mean_logits))
    per_head, _ = obj.head_losses(ours_z, labels.expand(m, b), context)
    ours = per_head.sum()
    ours.backward()
    ours_fusion = [p.grad.clone() for p in obj.fusion.parameters()]

    en_fc = copy.deepcopy(obj.fusion)
    en_fc.zero_grad(set_to_none=True)
    ref_z, ref_f = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
    en_out = en_fc(torch.cat(list(ref_f), dim=1))               # resnet.py lines 218-219
    theirs = reference_pcl_loss([*ref_z, en_out], [en_out.detach(), *mean_logits, labels], epoch)
    theirs.backward()

    assert_close_scaled(ours, theirs, "loss")
    assert_close_scaled(ours_z.grad, ref_z.grad, "peers' logits gradient")
    assert_close_scaled(ours_f.grad, ref_f.grad, "pooled features' gradient")
    for mine, ref, name in zip(ours_fusion, en_fc.parameters(), ("weight", "bias")):
        assert_close_scaled(mine, ref.grad, f"fusion {name} gradient")
    assert ref_f.grad.abs().max() > 1e-3  # the ensemble's CE reaches the peers' features


def test_the_ramp_up_is_the_papers_where_the_code_slips():
    """The code divides by ``lambd = 1`` where it means ``alpha = 80``: weight 1 at epoch 1,
    about 0 from epoch 3 to 80; ours rises over 80 epochs (equal at 0 and after 80)."""
    obj = PeerCollaborativeLoss()
    assert sigmoid_rampup(40.0, obj.rampup_epochs) == pytest.approx(math.exp(-5 * 0.25))
    assert reference_rampup_weight(40) < 1e-100
    assert reference_rampup_weight(1) == 1.0
    for epoch in (0, 81, 200):
        assert sigmoid_rampup(epoch, 80.0) == pytest.approx(reference_rampup_weight(epoch))


# ============================================================================ by hand

class TinyPeers(nn.Module):
    """m peers over a shared trunk on per-head inputs ``[m, B, 4]``: trunk ``Linear(4, 6)``,
    peer i's branch ``Linear(6, 5)`` + ReLU (its pooled feature f_i) and head ``Linear(5, C)``.
    ``forward`` gives the logits ``[m, B, C]``; ``run`` the logits and features ``[m, B, 5]``."""

    def __init__(self, m: int, c: int) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.branches = nn.ModuleList(nn.Linear(6, 5) for _ in range(m))
        self.heads = nn.ModuleList(nn.Linear(5, c) for _ in range(m))

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.stack([torch.relu(branch(self.trunk(v))) for branch, v in zip(self.branches, x)])
        return torch.stack([head(fi) for head, fi in zip(self.heads, f)]), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


def hand_pcl(z, f, y, mean_z, fusion: nn.Linear, t: float, w: float, detach_ensemble=True):
    """PCL written out, head by head: CE(y, z_e) + sum_i [CE(y, z_i) + w T^2 KL(p_e || q_i)
    + w T^2 / (m-1) sum_{j != i} KL(p'_j || q_i)], p_e = softmax(z_e / T) detached (unless
    ``detach_ensemble`` is false: the wrong variant, to show the test can tell), p'_j from the
    given temporal-mean logits."""
    m, b = z.shape[:2]

    def ce(logits):
        return -torch.log_softmax(logits, 1)[torch.arange(b), y].mean()

    def kl(p, logits):
        return (p * (p.log() - torch.log_softmax(logits / t, 1))).sum(1).mean() * t * t

    z_e = torch.cat([f[i] for i in range(m)], dim=1) @ fusion.weight.T + fusion.bias
    p_e = torch.softmax(z_e / t, 1)
    p_e = p_e.detach() if detach_ensemble else p_e
    total = ce(z_e)
    for i in range(m):
        mean_teachers = [kl(torch.softmax(mean_z[j] / t, 1), z[i]) for j in range(m) if j != i]
        total = total + ce(z[i]) + w * kl(p_e, z[i]) + w * sum(mean_teachers) / (m - 1)
    return total


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("m", [2, 3])
def test_pcl_equals_the_hand_computation_and_detaches_its_teachers_on_parameter_gradients(m):
    """Loss and every parameter's gradient (peers, trunk, fusion classifier) equal the hand
    computation; the temporal mean gets no gradient; the ensemble target is detached, so the
    fusion classifier's gradient is that of CE(y, z_e) alone."""
    b, c, t = 5, 4, 3.0
    step = Step(epoch=3, batch=0, epochs=10, batches=4)       # mid ramp-up (R = 4): w = 0.73
    w = math.exp(-5 * (1 - 3 / 4) ** 2)
    torch.manual_seed(0)
    peers = TinyPeers(m, c)
    mean = copy.deepcopy(peers)                               # the temporal mean: other weights
    with torch.no_grad():
        for p in mean.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(m, b, 4)
    y = torch.randint(0, c, (b,))
    obj = objective_with_fusion(m, 5, c, t=t, rampup=4.0)

    z, f = peers.run(x)
    context = LossContext({INPUT: x, "feat": f}, step, temporal_mean=mean)
    per_head, parts = obj.head_losses(z, y.expand(m, b), context)
    per_head.sum().backward()
    ours_peers, ours_fusion = grads(peers), grads(obj.fusion)

    assert all(p.grad is None for p in mean.parameters()), "the temporal mean got a gradient"
    peers.zero_grad(set_to_none=True)
    obj.fusion.zero_grad(set_to_none=True)
    with torch.no_grad():
        mean_z = mean(x)
    z, f = peers.run(x)
    expected = hand_pcl(z, f, y, mean_z, obj.fusion, t, w)
    expected.backward()
    assert_close_scaled(per_head.sum(), expected, "loss")
    for name, g in grads(peers).items():
        assert_close_scaled(ours_peers[name], g, f"{name} gradient")
    for name, g in grads(obj.fusion).items():
        assert_close_scaled(ours_fusion[name], g, f"fusion.{name} gradient")
    assert_close_scaled(parts["ensemble"].sum(), F.cross_entropy(
        torch.cat(list(f), 1) @ obj.fusion.weight.T + obj.fusion.bias, y), "ensemble part")

    # the fusion classifier learns from CE(y, z_e) only ...
    obj.fusion.zero_grad(set_to_none=True)
    z, f = peers.run(x)
    F.cross_entropy(obj.fusion(torch.cat(list(f), 1)), y).backward()
    for name, g in grads(obj.fusion).items():
        assert_close_scaled(ours_fusion[name], g, f"fusion.{name}: CE alone")
    # ... which the test would see if the KL's target were not detached
    obj.fusion.zero_grad(set_to_none=True)
    z, f = peers.run(x)
    hand_pcl(z, f, y, mean_z, obj.fusion, t, w, detach_ensemble=False).backward()
    assert (grads(obj.fusion)["weight"] - ours_fusion["weight"]).abs().max() > 1e-3


def test_without_a_temporal_mean_the_peers_detached_logits_stand_in():
    """An API call without the engine's EMA: the temporal mean of decay 0, the peers' own
    logits, detached (the same loss as passing a copy of the peers)."""
    m, b, c = 3, 5, 4
    torch.manual_seed(0)
    peers = TinyPeers(m, c)
    x, y = torch.randn(m, b, 4), torch.randint(0, c, (b,))
    obj = objective_with_fusion(m, 5, c, rampup=0.0)
    z, f = peers.run(x)
    alone, _ = obj.head_losses(z, y.expand(m, b), LossContext({INPUT: x, "feat": f}, Step()))
    copied, _ = obj.head_losses(z, y.expand(m, b), LossContext(
        {INPUT: x, "feat": f}, Step(), temporal_mean=copy.deepcopy(peers)))
    assert torch.equal(alone, copied)


# ============================================================================ the graph it needs

def small_tree(**args) -> nn.Module:
    return build_graph("tree", "cifar_resnet20", model_kwargs={"num_classes": 10},
                       input_size=(3, 16, 16), **args).eval()


def test_a_tree_with_views_runs_each_head_on_its_own_view_and_a_tree_without_refuses():
    net = small_tree(split=["layer2", "global_pool"], heads=3, branches=[3, 1], views=True)
    assert net.per_head_input and net.config.args["views"] is True
    views = torch.randn(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net.run(views, wants=("global_pool",))
        for h in range(3):
            shared = net.run(views[h], wants=("global_pool",))
            assert_same_logits(out.logits[h], shared.logits[h])
            assert_same_logits(out.features["global_pool"][h], shared.features["global_pool"][h])
        assert not torch.allclose(out.logits[0], net(views[1])[0])
    plain = small_tree(split=["layer2"], heads=2)
    assert not plain.per_head_input and "views" not in plain.config.args
    with pytest.raises(UserError, match="one batch"):
        plain(torch.randn(2, 4, 3, 16, 16))


def test_identical_views_give_the_shared_batchs_gradients_backprop_rescaling_included():
    """Head by head through the trunk, each branch point scaled by 1/children as a shared batch
    is: with every view equal, every parameter's gradient is the shared batch's."""
    net = small_tree(split=["layer1", "layer2"], heads=4, branches=[2, 2], views=True).train()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    weights = torch.arange(1.0, 5.0).view(4, 1, 1)
    (net(x) * weights).square().mean().backward()
    shared = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    (net(x.expand(4, *x.shape)) * weights).square().mean().backward()
    for name, param in net.named_parameters():
        assert_close_scaled(param.grad, shared[name], name)


def test_attach_refuses_a_tree_without_views_or_without_a_feature_per_peer():
    obj = build_objective("pcl")
    with pytest.raises(UserError, match="graph.views=true"):
        obj.attach(small_tree(split=["layer2", "global_pool"], heads=2, branches=[2, 1]))
    with pytest.raises(UserError, match="only split point is the shared trunk"):
        obj.attach(small_tree(split=["layer2"], heads=2, views=True))
    with pytest.raises(UserError, match="shared trunk: pattern tree"):
        obj.attach(build_graph("instances", "cifar_resnet20", heads=2, input_size=(3, 16, 16),
                               model_kwargs={"num_classes": 10}))
    obj.attach(small_tree(split=["layer2", "global_pool"], heads=3, branches=[3, 1], views=True))
    assert (obj.fusion.in_features, obj.fusion.out_features) == (3 * 64, 10)


def test_a_pcl_recipe_gets_the_methods_graph_defaults_and_its_own_values_win():
    recipe = load_recipe(None, ["objective.name=pcl", "graph.heads=3",
                                "graph.split=[layer2,global_pool]", "graph.branches=[3,1]"])
    assert recipe.graph.args["rescale"] == "none" and recipe.graph.args["views"] is True
    own = load_recipe(None, ["objective.name=pcl", "graph.views=false", "graph.rescale=loss"])
    assert own.graph.args["views"] is False and own.graph.args["rescale"] == "loss"
    for name in ("demo-pcl", "cifar100-resnet32-pcl", "cifar100-resnet110-pcl"):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.objective.name == "pcl" and r.data.views == "per_head"
        assert r.train.ema_decay is not None and r.train.ema_select


# ============================================================================ end to end

PCL_OVERRIDES = ["objective.name=pcl", "objective.rampup_epochs=1", "graph.heads=3",
                 "graph.split=[layer2,global_pool]", "graph.branches=[3,1]",
                 "data.views=per_head", "train.ema_decay=0.9", "train.ema_warmup=true",
                 "train.ema_select=true", "run.checkpoint_every=5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs (16 optimizer steps) of PCL, straight through (shared, read only)."""
    root = tmp_path_factory.mktemp("pcl")
    recipe = tiny_recipe(root, *PCL_OVERRIDES, "run.name=straight")
    return recipe, engine.train(recipe)


def latest_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(run_dir / "checkpoints") / checkpoint.EMA))


@pytest.mark.slow
def test_a_resumed_pcl_run_is_bit_identical_with_its_temporal_means(straight, tmp_path, capsys):
    """Stopped mid-epoch at step 5 and resumed: the live weights (graph and fusion classifier),
    the EMA (the peer mean teachers the loss reads) and the history all bit-equal."""
    _, run_a = straight
    run_b = tmp_path / "resumed"
    stop_then_resume(lambda *more: tiny_recipe(tmp_path, *PCL_OVERRIDES, "run.name=resumed",
                                               *more), run_b, 5, capsys)
    weights = latest_weights(run_a)
    assert any(k.startswith("objective.fusion.") for k in weights)
    assert_same_weights(latest_weights(run_b), weights)
    assert_same_weights(latest_ema(run_b), latest_ema(run_a))
    assert engine.history_of(run_b) == engine.history_of(run_a)


@pytest.mark.slow
def test_the_export_is_the_best_peers_ema_and_loads_strictly_into_the_plain_model(
        straight, tmp_path, capsys):
    recipe, run_dir = straight
    history = engine.history_of(run_dir)
    best = history[-1]["ema"]["holdout"]["best_head"]
    assert json.loads((run_dir / "summary.json").read_text())["best_head"] == best
    out = tmp_path / "pcl.safetensors"
    assert cli.main(["export", str(run_dir), "-o", str(out)]) == 0  # ema_select: EMA, best
    assert f"exported head {best} " in capsys.readouterr().out

    model = timm.create_model(recipe.model.name, num_classes=10)
    model.load_state_dict(load_file(str(out)), strict=True)
    ema_graph = rebuild(config_from_json((run_dir / "graph.json").read_text()))
    ema_graph.load_state_dict(latest_ema(run_dir), strict=True)
    test = load_splits(**data_arguments(recipe.data), seed=recipe.seed).test
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        assert_same_logits(model.eval()(images), ema_graph.eval()(images)[best])
    exported = load_file(str(out))
    assert_same_weights(exported, ema_graph.head_state_dict(best))  # the EMA's, not the live
    live = checkpoint.split_state(latest_weights(run_dir))[0]
    assert not torch.equal(exported["conv1.weight"], live["stages.0.0.conv1.weight"])
