"""Pretrained initialisation (``model.pretrained``, ``cs.wrap(..., pretrained=...)``,
``graph.copies``): weights from a file or the local cache reach every stage copy (or only head
0's path), a classifier for another class count starts fresh, a file that does not fit is one
line naming the key and both shapes, ``true`` never downloads, rebuilds need no file, and a
recipe trains and exports strictly.

The "pretrained" files are untrained models' state dicts with every float tensor replaced by
values no initialisation draws (uniform in [0.5, 1.5)), written into ``tmp_path``.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.errors import UserError
from collabsurgery.graphs.saving import load_graph, save_graph
from collabsurgery.models import backbones
from collabsurgery.models.pretrained import classifier_modules

from helpers import make_input, one_line_error, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

C = 10
SIZE = (3, 32, 32)


def distinct(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """``state`` with every float tensor replaced by values in [0.5, 1.5): no initialisation
    gives them, and BatchNorm variances stay positive."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def weights_file(tmp_path: Path, name: str, num_classes: int = 1000, suffix: str = ".safetensors"
                 ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A "pretrained" weights file of model ``name`` built for ``num_classes``, and its state."""
    spec = backbones.parse_model_name(name, {"num_classes": num_classes})
    state = distinct(backbones.create(spec).state_dict())
    path = tmp_path / f"{name.replace('.', '_')}-{num_classes}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


def under(key: str, module: str) -> bool:
    return key.startswith(module + ".")


def floats(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


# ---------------------------------------------------------------------------- copies

TREES = [  # model, split, its classifier, file suffix
    ("resnet18", "layer2,layer3", "fc", ".safetensors"),
    ("torchvision.mobilenet_v2", "features.4,features.11", "classifier.1", ".pth"),
]


@pytest.mark.parametrize("model, split, classifier, suffix", TREES)
def test_every_copy_starts_from_the_pretrained_weights(tmp_path, model, split, classifier,
                                                       suffix):
    path, state = weights_file(tmp_path, model, 1000, suffix)
    net = cs.wrap(model, split=split, heads=4, num_classes=C, input_size=SIZE,
                  pretrained=str(path))
    heads = [net.head_state_dict(h) for h in range(4)]
    for h, own in enumerate(heads):
        body = [k for k in own if not under(k, classifier)]
        assert all(torch.equal(own[k], state[k]) for k in body), f"head {h}"
        assert own[f"{classifier}.weight"].shape[0] == C  # another class count: fresh
    tops = [own[f"{classifier}.weight"] for own in heads]
    assert all(not torch.equal(tops[i], tops[j]) for i in range(4) for j in range(i))
    assert net.config.args["copies"] == "pretrained" and "pretrained" not in net.config.args


@pytest.mark.parametrize("model, split, classifier, suffix", TREES)
def test_copies_fresh_keeps_the_weights_on_head_0s_path_only(tmp_path, model, split,
                                                             classifier, suffix):
    path, state = weights_file(tmp_path, model, 1000, suffix)
    net = cs.wrap(model, split=split, heads=4, num_classes=C, input_size=SIZE,
                  pretrained=path, copies="fresh")
    others = 0
    for i, copies in enumerate(net.stages):
        for c, copy in enumerate(copies):
            own = copy.state_dict()
            body = [k for k in floats(own) if not under(k, classifier)]
            if c == 0:
                assert all(torch.equal(own[k], state[k]) for k in body), f"stage {i}"
            else:
                others += 1
                assert not any(torch.equal(own[k], state[k]) for k in body), f"stage {i} copy {c}"
    assert others == 1 + 3  # (1, 2, 2) fan-outs: one more copy of stage 1, three of stage 2
    assert net.config.args["copies"] == "fresh"


def test_the_classifier_is_loaded_when_the_class_count_matches(tmp_path):
    path, state = weights_file(tmp_path, "resnet18", C)
    net = cs.wrap("resnet18", split="layer2,layer3", heads=4, num_classes=C, input_size=SIZE,
                  pretrained=path)
    for h in range(4):
        own = net.head_state_dict(h)
        assert own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


def test_without_pretrained_weights_copies_are_fresh_as_before():
    torch.manual_seed(0)
    default = cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, input_size=SIZE)
    torch.manual_seed(0)
    fresh = cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, input_size=SIZE,
                    copies="fresh")
    a, b = default.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(default.head_state_dict(0)["layer2.0.conv1.weight"],
                           default.head_state_dict(3)["layer2.0.conv1.weight"])


@pytest.mark.parametrize("classifier, expected", [
    ("resnet18", ("fc",)),  # timm: pretrained_cfg["classifier"]
    ("torchvision.mobilenet_v2", ("classifier.1",)),  # the keys num_classes shapes
    ("torchvision.vgg11", ("classifier.6",)),
    ("torchvision.googlenet", ("aux1.fc2", "aux2.fc2", "fc")),  # auxiliary classifiers too
    ("torchvision.regnet_y_400mf", ("fc",)),  # no meta-device build: the last module run
])
def test_the_classifier_is_the_models_own(classifier, expected):
    kwargs = {"num_classes": C, **({"init_weights": False} if "googlenet" in classifier else {})}
    module, spec = backbones.resolve(classifier, **kwargs)
    assert classifier_modules(module, spec, SIZE) == expected


def test_a_ready_module_finds_its_classifier_by_running_it(tmp_path):
    path, state = weights_file(tmp_path, "torchvision.resnet18", 1000)
    module = backbones.create(backbones.parse_model_name("torchvision.resnet18",
                                                         {"num_classes": C}))
    net = cs.wrap(module, split="layer3", heads=2, input_size=SIZE, pretrained=path)
    own = net.head_state_dict(1)
    assert all(torch.equal(own[k], state[k]) for k in own if not under(k, "fc"))


# ---------------------------------------------------------------------------- other graph kinds

def test_peers_take_one_entry_per_student(tmp_path):
    path, state = weights_file(tmp_path, "resnet18", 1000)
    net = cs.wrap(["resnet18", "resnet18"], pattern="peers", num_classes=C, input_size=SIZE,
                  pretrained=[str(path), None])
    first, second = net.head_state_dict(0), net.head_state_dict(1)
    body = [k for k in floats(first) if not under(k, "fc")]
    assert all(torch.equal(first[k], state[k]) for k in body)
    assert not any(torch.equal(second[k], state[k]) for k in body)  # untrained
    both = cs.wrap(["resnet18", "resnet18"], pattern="peers", num_classes=C, input_size=SIZE,
                   pretrained=path)  # one value: every student
    for k in range(2):
        own = both.head_state_dict(k)
        assert all(torch.equal(own[key], state[key]) for key in body)
    assert not torch.equal(both.head_state_dict(0)["fc.weight"],
                           both.head_state_dict(1)["fc.weight"])
    assert "pretrained" not in net.config.args
    with pytest.raises(UserError, match="pretrained gives 3 entries for 2 students"):
        cs.wrap(["resnet18", "resnet18"], pattern="peers", input_size=SIZE,
                pretrained=[str(path), None, None])


@pytest.mark.parametrize("pattern, args", [
    ("instances", {"heads": 2}),
    ("routed", {"split": "layer1,layer2", "modules": 2, "students": 3}),
])
@pytest.mark.parametrize("copies", ["pretrained", "fresh"])
def test_instances_and_routed_modules_follow_copies(tmp_path, pattern, args, copies):
    path, state = weights_file(tmp_path, "cifar_resnet20", 100)
    net = cs.wrap("cifar_resnet20", pattern=pattern, num_classes=C, input_size=SIZE,
                  pretrained=path, copies=copies, **args)
    for stage in net.stages:
        for c, copy in enumerate(stage):
            own = copy.state_dict()
            body = [k for k in floats(own) if not under(k, "fc")]
            kept = [torch.equal(own[k], state[k]) for k in body]
            assert all(kept) if c == 0 or copies == "pretrained" else not any(kept)


def test_dropout_views_start_from_the_pretrained_weights(tmp_path):
    path, state = weights_file(tmp_path, "cifar_resnet20", C)
    net = cs.wrap("cifar_resnet20", pattern="dropout", input_size=SIZE, pretrained=path)
    own = net.head_state_dict(0)
    assert all(torch.equal(own[k], state[k]) for k in own)


# ---------------------------------------------------------------------------- files that do not fit

def test_a_file_that_does_not_fit_names_the_key_and_both_shapes(tmp_path):
    _, state = weights_file(tmp_path, "resnet18", 1000)
    bad = tmp_path / "w.safetensors"
    save_file({**state, "layer1.0.conv1.weight": torch.zeros(32, 32, 3, 3)}, str(bad))
    with pytest.raises(UserError) as err:
        cs.wrap("resnet18", split="layer2", heads=2, num_classes=C, input_size=SIZE,
                pretrained=str(bad))
    assert str(err.value) == (f"model.pretrained {bad} does not fit resnet18: "
                              "layer1.0.conv1.weight is [32, 32, 3, 3] in the file but "
                              "[64, 64, 3, 3] in the model")


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.pop("layer4.1.bn2.weight"), "layer4.1.bn2.weight ([512] in the model) is "
                                             "missing from the file"),
    (lambda s: s.update({"extra.weight": torch.zeros(3)}), "the file has extra.weight ([3]), "
                                                            "which the model does not"),
])
def test_a_missing_or_unexpected_key_is_named(tmp_path, change, expected):
    _, state = weights_file(tmp_path, "resnet18", 1000)
    change(state)
    bad = tmp_path / "w.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match=f"does not fit resnet18: {expected}".replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        cs.wrap("resnet18", split="layer2", heads=2, num_classes=C, input_size=SIZE,
                pretrained=bad)


def test_checkpoints_load_as_timm_reads_them(tmp_path):
    """A training checkpoint's EMA weights, a DDP ``module.`` prefix, and old BatchNorm states
    without ``num_batches_tracked`` (torchvision's own ImageNet files)."""
    _, state = weights_file(tmp_path, "resnet18", 1000)
    old = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {}, "state_dict_ema": old}, path)
    net = cs.wrap("resnet18", split="layer2", heads=2, num_classes=C, input_size=SIZE,
                  pretrained=path)
    own = net.head_state_dict(1)
    assert all(torch.equal(own[k], state[k]) for k in floats(own) if not under(k, "fc"))


@pytest.mark.parametrize("content, expected", [
    (None, "names no existing file"),
    ([1, 2], "holds no state dict"),
    (b"not a checkpoint", "could not be read as a state dict"),
])
def test_a_file_that_is_no_state_dict_is_one_line(tmp_path, content, expected):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=expected) as err:
        cs.wrap("resnet18", split="layer2", heads=2, input_size=SIZE, pretrained=path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_the_cli_refuses_a_file_that_does_not_fit_with_exit_2_and_writes_nothing(tmp_path,
                                                                                  capsys):
    _, state = weights_file(tmp_path, "resnet18", 1000)
    bad = tmp_path / "w.safetensors"
    save_file({**state, "conv1.weight": torch.zeros(64, 1, 7, 7)}, str(bad))
    out = tmp_path / "graph.safetensors"
    code = cli.main(["wrap", "resnet18", "--split", "layer2", "--heads", "2", "--input-size",
                     "32", "--num-classes", str(C), "--pretrained", str(bad), "--save", str(out)])
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert "conv1.weight is [64, 1, 7, 7] in the file but [64, 3, 7, 7] in the model" in line
    assert not out.exists()


def test_the_cli_wraps_with_pretrained_weights(tmp_path, capsys):
    path, state = weights_file(tmp_path, "resnet18", 1000)
    out = tmp_path / "graph.safetensors"
    assert cli.main(["wrap", "resnet18", "--split", "layer2", "--heads", "2", "--input-size",
                     "32", "--num-classes", str(C), "--pretrained", str(path), "--copies",
                     "fresh", "--save", str(out)]) == 0
    net = load_graph(out)
    assert torch.equal(net.head_state_dict(0)["layer3.0.conv1.weight"],
                       state["layer3.0.conv1.weight"])
    assert not torch.equal(net.head_state_dict(1)["layer3.0.conv1.weight"],
                           state["layer3.0.conv1.weight"])


# ---------------------------------------------------------------------------- true: the local cache

@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under ``tmp_path``, and no network at all."""
    hf, hub = tmp_path / "hf", tmp_path / "torch"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse, raising=False)
    return hf, hub


@pytest.mark.parametrize("model", ["resnet18", "torchvision.mobilenet_v2"])
def test_true_without_cached_weights_is_the_one_line_refusal(caches, model):
    with pytest.raises(UserError) as err:
        cs.wrap(model, split="layer2" if model == "resnet18" else "features.4", heads=2,
                num_classes=C, input_size=SIZE, pretrained=True)
    text = str(err.value)
    assert text.startswith(f"model.pretrained=true: no cached weights for '{model}' in the "
                           f"local cache (")
    assert "nothing is downloaded; valid: a weights file path" in text and "\n" not in text
    assert str(caches[1]) in text  # where it looked


def test_true_takes_timms_weights_from_the_hugging_face_cache(caches, tmp_path, monkeypatch):
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    repo = caches[0] / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    path, state = weights_file(tmp_path, "resnet18", 1000)
    path.rename(repo / "snapshots" / ("0" * 40) / "model.safetensors")
    create, offline = timm.create_model, []

    def watched(*args, **kwargs):  # the hub is offline while timm loads the weights
        if kwargs.get("pretrained"):
            offline.append((os.environ.get("HF_HUB_OFFLINE"),
                            huggingface_hub.constants.HF_HUB_OFFLINE))
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", watched)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest's setting off: wrap must set it itself
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    net = cs.wrap("resnet18", split="layer2,layer3", heads=4, num_classes=C, input_size=SIZE,
                  pretrained=True)
    assert offline == [("1", True)]  # and put back afterwards
    assert (os.environ["HF_HUB_OFFLINE"], huggingface_hub.constants.HF_HUB_OFFLINE) == ("0", False)
    own = net.head_state_dict(3)
    assert all(torch.equal(own[k], state[k]) for k in own if not under(k, "fc"))


def test_true_takes_torchvisions_weights_from_the_torch_hub_cache(caches, tmp_path):
    import torchvision

    url = torchvision.models.get_model_weights("mobilenet_v2").DEFAULT.url
    path, state = weights_file(tmp_path, "torchvision.mobilenet_v2", 1000, ".pth")
    (caches[1] / "checkpoints").mkdir(parents=True)
    path.rename(caches[1] / "checkpoints" / Path(url).name)
    net = cs.wrap("torchvision.mobilenet_v2", split="features.4", heads=2, num_classes=C,
                  input_size=SIZE, pretrained=True)
    own = net.head_state_dict(1)
    assert all(torch.equal(own[k], state[k]) for k in own if not under(k, "classifier.1"))


# ---------------------------------------------------------------------------- rebuild, recipes

def test_a_rebuilt_graph_needs_no_pretrained_file(tmp_path):
    path, _ = weights_file(tmp_path, "cifar_resnet20", C)
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, input_size=SIZE, pretrained=path,
                  copies="fresh")
    saved = save_graph(net, tmp_path / "graph.safetensors")
    path.unlink()
    again = load_graph(saved)
    assert again.config == net.config and again.config.args["copies"] == "fresh"
    mine, theirs = net.state_dict(), again.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_recipe_keys(tmp_path):
    path, _ = weights_file(tmp_path, "cifar_resnet20", C)
    recipe = tiny_recipe(tmp_path, f"model.pretrained={path}", "graph.copies=fresh")
    assert recipe.model.pretrained == str(path) and recipe.graph.args["copies"] == "fresh"
    with pytest.raises(UserError, match="recipe key 'graph.pretrained' is set from "
                                        "'model.pretrained'"):
        tiny_recipe(tmp_path, f"graph.pretrained={path}")
    with pytest.raises(UserError, match="recipe key 'model.pretrained'"):
        tiny_recipe(tmp_path, "model.pretrained={a: 1}")


@pytest.mark.usefixtures("forget_accelerate_state")
def test_a_recipe_with_pretrained_weights_trains_and_exports_strictly(tmp_path):
    from collabsurgery.export import load_backbone
    from collabsurgery.export.from_run import export_from_source
    from collabsurgery.train import engine

    path, state = weights_file(tmp_path, "cifar_resnet20", 100)  # 100 classes, the data 10
    run_dir = engine.train(tiny_recipe(tmp_path / "runs", f"model.pretrained={path}",
                                       "train.max_steps=1", "train.epochs=1", "train.lr=1e-9"))
    out, _ = export_from_source(run_dir, "1", tmp_path / "head1.safetensors")
    model = load_backbone(out)  # strict, into the plain model
    assert model.fc.out_features == C
    for name, value in model.named_parameters():  # one step of a tiny lr from the file's
        if not under(name, "fc"):
            torch.testing.assert_close(value.detach(), state[name], rtol=0, atol=1e-5)
    plain = timm.create_model("cifar_resnet20", num_classes=C).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(make_input(2, 16)), model(make_input(2, 16)))


@pytest.mark.slow
@pytest.mark.usefixtures("forget_accelerate_state")
def test_a_resumed_run_needs_no_pretrained_file(tmp_path, capsys):
    """Resuming loads every weight from the checkpoint: the pretrained file may be gone, and
    the run ends as a straight one does."""
    from collabsurgery.train import engine
    from helpers import latest_weights, stop_then_resume

    path, _ = weights_file(tmp_path, "cifar_resnet20", 100)
    on = [f"model.pretrained={path}", "graph.execution=loop"]
    straight = engine.train(tiny_recipe(tmp_path, *on, "run.name=straight"))
    resumed = tmp_path / "resumed"

    def recipe(*more):
        if "run.resume=auto" in more:
            path.unlink(missing_ok=True)
        return tiny_recipe(tmp_path, *on, "run.name=resumed", *more)

    stop_then_resume(recipe, resumed, 5, capsys)
    assert not path.exists()
    for key, value in latest_weights(straight).items():
        assert torch.equal(latest_weights(resumed)[key], value), key


@pytest.mark.usefixtures("forget_accelerate_state")
@pytest.mark.parametrize("override, named", [
    ("model.pretrained={where}/missing.safetensors", "names no existing file"),
    ("model.pretrained={where}/w.safetensors", "layer1.0.conv1.weight is [8, 16, 3, 3] in "
                                               "the file but [16, 16, 3, 3] in the model"),
    ("model.pretrained=[{where}/w.safetensors, null]", "recipe key 'model.pretrained' must be"),
])
def test_a_bad_pretrained_recipe_is_one_line_exit_2_before_anything_is_written(
        tmp_path, capsys, override, named):
    _, state = weights_file(tmp_path, "cifar_resnet20", C)
    save_file({**state, "layer1.0.conv1.weight": torch.zeros(8, 16, 3, 3)},
              str(tmp_path / "w.safetensors"))
    runs = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: pre\n")
    code = cli.main(["train", "--recipe", str(recipe), "data.image_size=16",
                     "data.max_train_examples=128", "train.batch_size=16",
                     "model.name=cifar_resnet20", "graph.heads=2", "graph.split=[layer1]",
                     "run.progress=false", f"run.dir={runs}", override.format(where=tmp_path)])
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert named in line and "model.pretrained" in line
    assert not runs.exists()
