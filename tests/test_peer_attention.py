"""OKDDip (Chen et al. 2020): the peer attention (shapes, any feature size, against loops), the
loss against a hand computation, which parameters each part of the loss reaches (nothing
detached, as in the authors' code: checked on parameter gradients here and against a
transcription of that code in test_reference_losses.py), graphs that do not suit it (API and
CLI), and a tree of 3 peers + a leader trained through the engine: attention checkpointed,
never exported, resumed bit-exactly, the leader exported by default."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import collabsurgery as cs
from collabsurgery.cli import main
from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs import build_graph
from collabsurgery.models import backbones
from collabsurgery.objectives import PeerAttentionLoss, build_objective
from collabsurgery.objectives.base import LossContext, Step, sigmoid_rampup
from collabsurgery.objectives.peer_attention import PeerAttention
from collabsurgery.train import engine

from helpers import (assert_same_logits, assert_same_weights, latest_weights, make_input,
                     one_line_error, random_logits, ref_kl, ref_log_softmax, ref_softmax,
                     stop_then_resume)

REPO = Path(__file__).resolve().parents[1]
RESNET = {"model_kwargs": {"num_classes": 10}}
OKDDIP_GRAPH = {"split": ["layer2", "global_pool"], "heads": 4, "branches": [4, 1]}

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


def _tree(size: int = 16, **args):
    return build_graph("tree", "cifar_resnet20", input_size=(3, size, size), **RESNET,
                       **{**OKDDIP_GRAPH, **args})


def _features(p: int = 3, b: int = 4, c: int = 6, spatial: tuple[int, ...] = (2, 3),
              seed: int = 0) -> torch.Tensor:
    return torch.randn(p, b, c, *spatial, generator=torch.Generator().manual_seed(seed))


def _attention_by_loops(attention: PeerAttention, features: torch.Tensor) -> list:
    """alpha[b][a][j] with plain Python: pool, project, dot, softmax over j."""
    wq, wk = attention.query.weight.tolist(), attention.key.weight.tolist()
    p, b = features.shape[:2]
    pooled = features.flatten(3).mean(-1).tolist()
    project = lambda w, h: [sum(wi * hi for wi, hi in zip(row, h)) for row in w]
    out = []
    for n in range(b):
        q = [project(wq, pooled[a][n]) for a in range(p)]
        k = [project(wk, pooled[j][n]) for j in range(p)]
        rows = []
        for a in range(p):
            energy = [sum(x * y for x, y in zip(q[a], k[j])) for j in range(p)]
            top = max(energy)
            e = [math.exp(v - top) for v in energy]
            rows.append([v / sum(e) for v in e])
        out.append(rows)
    return out


# ---------------------------------------------------------------------------- the attention

@pytest.mark.parametrize("spatial", [(2, 3), (5, 5), ()])
def test_attention_rows_are_distributions_over_peers_at_any_feature_size(spatial) -> None:
    torch.manual_seed(0)
    attention = PeerAttention(6, factor=2)
    assert (attention.query.in_features, attention.query.out_features) == (6, 3)
    assert attention.query.bias is None and attention.key.bias is None
    features = _features(spatial=spatial)
    alpha = attention(features)
    assert alpha.shape == (4, 3, 3)  # [B, peer a, peer j]
    assert (alpha >= 0).all() and torch.allclose(alpha.sum(-1), torch.ones(4, 3))
    expected = torch.tensor(_attention_by_loops(attention, features if spatial else
                                                features[..., None]))
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)


def test_attach_sizes_the_projections_from_the_peers_pooled_feature() -> None:
    graph = _tree()
    obj = build_objective("okddip")
    obj.attach(graph)
    assert obj.wants == ("global_pool",)
    assert (obj.attention.query.in_features, obj.attention.query.out_features) == (64, 8)
    before = obj.attention
    obj.attach(graph)
    assert obj.attention is before  # checkpointed weights still load after a second attach
    wide = build_objective("okddip", feature="global_pool", projection_factor=4)
    wide.attach(graph)
    assert wide.attention.query.out_features == 16


# ---------------------------------------------------------------------------- the loss

def _context(features: torch.Tensor, step: Step | None = None) -> LossContext:
    leader = features[:1] * 0  # the leader's feature is never read
    return LossContext({"feat": torch.cat([features, leader])}, step or Step())


def _attached(c: int = 6, **kwargs) -> PeerAttentionLoss:
    obj = PeerAttentionLoss(feature="feat", **kwargs)
    obj.wants = ("feat",)
    torch.manual_seed(1)
    obj.attention = PeerAttention(c, factor=2)
    return obj


@pytest.mark.parametrize("t, weight, step", [
    (3.0, 1.0, Step(epoch=100, batches=10)),           # ramp done
    (2.0, 0.5, Step(epoch=1, batch=3, batches=10)),    # ramping: t = 1.3 epochs
])
def test_loss_matches_a_hand_computation(t: float, weight: float, step: Step) -> None:
    obj = _attached(temperature=t, weight=weight, rampup_epochs=4.0)
    z, y = random_logits(h=4, b=4)
    features = _features()
    alpha = _attention_by_loops(obj.attention, features)
    zs, ys = z.tolist(), y.tolist()
    ramp = sigmoid_rampup(step.epoch + step.batch / step.batches, 4.0)
    expected = []
    for head in range(4):
        soft = hard = 0.0
        for b in range(4):
            if head < 3:
                target = [sum(alpha[b][head][j] * zs[j][b][c] for j in range(3))
                          for c in range(5)]
            else:
                target = [sum(zs[j][b][c] for j in range(3)) / 3 for c in range(5)]
            soft += ref_kl(ref_softmax(target, t), ref_log_softmax(zs[head][b], t)) * t * t / 4
            hard += -ref_log_softmax(zs[head][b])[ys[b]] / 4
        expected.append(hard + weight * ramp * soft)
    losses, _ = obj.head_losses(z, y.expand(4, 4), _context(features, step))
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_gradients_reach_what_the_reference_code_reaches_for_each_parameter_group() -> None:
    """Nothing is detached (DefangChen/OKDDip, see tests/test_reference_losses.py): peer a's KL
    reaches the attention, the trunk and every peer's branch (its target mixes all peers'
    logits, weighted by the attention over all peers' features), never the leader's; the
    leader's loss reaches every branch (its target is the peers' mean) but not the attention;
    a CE reaches its own branch and the trunk only, never the attention."""
    graph = _tree()
    obj = build_objective("okddip", rampup_epochs=0.0)
    obj.attach(graph)
    x, y = make_input(8, 16, seed=3), torch.arange(8) % 10
    branch = {h: [p for n, p in graph.stages[1][h].named_parameters()] for h in range(4)}
    classifier = {h: list(graph.stages[2][h].parameters()) for h in range(4)}
    trunk = list(graph.stages[0][0].parameters())
    attention = list(obj.attention.parameters())

    def gradients(head: int, part: str) -> dict[str, bool]:
        graph.zero_grad(set_to_none=True)
        obj.zero_grad(set_to_none=True)
        out = graph.run(x, wants=obj.wants)
        losses, parts = obj.head_losses(out.logits, y.expand(4, 8), LossContext(out.features,
                                                                                Step()))
        (parts[part][head] if part else losses[head]).backward()
        reached = lambda ps: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
        return {"attention": reached(attention), "trunk": reached(trunk),
                **{f"branch{h}": reached(branch[h] + classifier[h]) for h in range(4)}}

    for a in range(3):
        got = gradients(a, "soft")
        assert got == {"attention": True, "trunk": True,
                       **{f"branch{h}": h < 3 for h in range(4)}}, (a, got)
        hard = gradients(a, "hard")
        assert hard == {"attention": False, "trunk": True,
                        **{f"branch{h}": h == a for h in range(4)}}, (a, hard)
    leader = gradients(3, "")
    assert leader == {"attention": False, "trunk": True,
                      **{f"branch{h}": True for h in range(4)}}, leader


def test_the_attention_features_and_every_peers_logits_get_the_targets_gradients() -> None:
    """On tensors: the features fed to the attention get gradient from the peers' KLs only,
    and the logits' gradient is that of the loss with its targets built from the live logits
    (against detaching them by hand, which is what the reference code does not do)."""
    obj = _attached()
    z, y = random_logits(h=4, b=4)
    z.requires_grad_(True)
    features = _features().requires_grad_(True)
    step = Step(epoch=100)
    losses, parts = obj.head_losses(z, y.expand(4, 4), _context(features, step))
    (g_peer_soft,) = torch.autograd.grad(parts["soft"][:3].sum(), features, retain_graph=True)
    assert g_peer_soft.abs().max() > 1e-4
    for other in (parts["hard"].sum(), parts["soft"][3]):  # CE and the leader's KL: none
        (g,) = torch.autograd.grad(other, features, retain_graph=True, allow_unused=True)
        assert g is None or g.abs().max() == 0
    (g_z,) = torch.autograd.grad(losses.sum(), z)
    t = obj.temperature

    def by_hand(detach: bool) -> torch.Tensor:
        zz = z.detach().clone().requires_grad_(True)
        source = zz.detach() if detach else zz
        alpha = obj.attention(features.detach())
        targets = torch.cat([torch.einsum("baj,jbc->abc", alpha, source[:3]),
                             source[:3].mean(0, keepdim=True)])
        p = torch.softmax(targets / t, dim=-1)
        log_q = torch.log_softmax(zz / t, dim=-1)
        manual = (torch.nn.functional.cross_entropy(zz.flatten(0, 1), y.repeat(4),
                                                    reduction="sum") / 4
                  + (p * (p.log() - log_q)).sum() / 4 * t * t)
        (g,) = torch.autograd.grad(manual, zz)
        return g

    torch.testing.assert_close(g_z, by_hand(detach=False))
    assert (g_z - by_hand(detach=True)).abs().max() > 1e-3  # the targets' share is not small


def test_defaults_arguments_and_bad_input() -> None:
    obj = build_objective("okddip")
    assert isinstance(obj, PeerAttentionLoss)
    assert (obj.temperature, obj.weight, obj.rampup_epochs, obj.projection_factor, obj.feature,
            obj.min_heads, obj.default_export) == (3.0, 1.0, 80.0, 8, None, 3, "last")
    z, y = random_logits(h=4, b=4)
    with pytest.raises(UserError, match=r"no attention yet: call attach\(graph\) first"):
        obj(z, y)
    with pytest.raises(UserError, match="at least 3 heads"):
        _attached()(z[:2], y)
    with pytest.raises(UserError, match="same examples"):
        _attached().head_losses(z, torch.stack([y, y, y, y.flip(0)]), _context(_features()))
    for kwargs, match in (({"temperature": 0}, "temperature"), ({"weight": -1}, "weight"),
                          ({"projection_factor": 0}, "projection_factor"),
                          ({"projection_factor": 2.5}, "projection_factor"),
                          ({"feature": 3}, "feature"), ({"gate": 1}, "no argument 'gate'")):
        with pytest.raises(UserError, match=match):
            build_objective("okddip", **kwargs)


@pytest.mark.parametrize("kind, model, args, match", [
    ("peers", ["cifar_resnet20", "cifar_wrn16_2", "cifar_resnet20"], {},
     "needs peers branching from a shared trunk.*got pattern peers$"),
    ("instances", "cifar_resnet20", {"heads": 3}, "shared trunk.*got pattern instances$"),
    ("tree", "cifar_resnet20", {"split": ["layer2"], "heads": 4},
     r"only split point is the shared trunk 'layer2'; split at \[layer2, .*global_pool.* "
     r"\[4, 1\]$"),
    ("tree", "cifar_resnet20", {"split": ["layer2", "global_pool"], "heads": 4,
                                "branches": [2, 2]}, "peers share 'global_pool'"),
])
def test_attach_refuses_graphs_without_each_peers_own_feature(kind, model, args, match) -> None:
    graph = build_graph(kind, model, input_size=(3, 16, 16), **RESNET, **args)
    with pytest.raises(UserError, match=match):
        build_objective("okddip").attach(graph)


def test_cli_peer_group_of_different_architectures_is_one_line_and_writes_nothing(
        tmp_path, capsys) -> None:
    argv = ["train", "--recipe", str(REPO / "recipes" / "demo-okddip.yaml"),
            "graph={pattern: peers}", "model.name=[cifar_resnet20, cifar_wrn16_2, cifar_resnet20]",
            "data.max_train_examples=64", "train.batch_size=16", f"run.dir={tmp_path / 'runs'}",
            "run.progress=false"]
    assert main(argv) == 2
    assert "OKDDip needs peers branching from a shared trunk" in \
        one_line_error(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- engine

@pytest.mark.slow
def test_engine_trains_the_attention_exports_the_leader_and_resumes_bit_exactly(
        tmp_path, capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(REPO / "recipes" / "demo-okddip.yaml", [
            "data.image_size=16", "data.max_train_examples=64", "train.batch_size=16",
            "run.progress=false", "train.epochs=2", "objective.rampup_epochs=1",
            "graph.execution=loop",  # two fresh runs of auto may choose differently
            f"run.dir={tmp_path}", f"run.name={name}", *more])

    straight = engine.train(recipe("straight"))
    table = capsys.readouterr().out
    assert "head 0 (peer" in table and "head 3 (leader" in table  # the run's summary table
    resumed = tmp_path / "resumed"
    stop_then_resume(lambda *more: recipe("resumed", *more), resumed, 6, capsys)
    a, b = (latest_weights(d) for d in (straight, resumed))
    assert_same_weights(a, b)
    attention_keys = sorted(k for k in a if k.startswith("objective."))
    assert attention_keys == ["objective.attention.key.weight", "objective.attention.query.weight"]
    mid = load_file(str(resumed / "checkpoints" / "ckpt-00000006" / "model.safetensors"))
    assert all(not torch.equal(mid[k], a[k]) for k in attention_keys)  # trained in steps 7-8

    out = tmp_path / "leader.safetensors"
    assert main(["export", str(straight), "-o", str(out)]) == 0
    assert "exported head 3" in capsys.readouterr().out
    exported = load_file(str(out))
    plain = backbones.resolve("cifar_resnet20", num_classes=10)[0].state_dict()
    assert set(exported) == set(plain) and not any("attention" in k for k in exported)
    graph, _ = load_run(straight)
    x = make_input(4, 16, seed=5)
    with torch.no_grad():
        assert_same_logits(cs.load_backbone(out)(x), graph(x)[3])


def test_demo_recipe_loads() -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-okddip.yaml")
    assert recipe.name == "demo-okddip" and recipe.objective.name == "okddip"
    assert recipe.objective.args == {"temperature": 3.0, "weight": 1.0, "rampup_epochs": 5.0}
    assert recipe.graph.pattern == "tree"
    assert {k: recipe.graph.args[k] for k in OKDDIP_GRAPH} == OKDDIP_GRAPH
