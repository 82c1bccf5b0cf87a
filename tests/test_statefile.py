"""statefile: optimizer / scheduler / scaler state in safetensors, loaded back exactly."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from collabsurgery.errors import UserError
from collabsurgery.rundir.training_state import FORMAT, load_state, save_state


def assert_same(actual, expected, where: str = "state") -> None:
    """Equal with the same types everywhere, floats and tensors bit for bit (nan included)."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected], where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}/{i}")
    elif isinstance(expected, torch.Tensor):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert torch.equal(actual.reshape(-1).view(torch.uint8),
                           expected.detach().cpu().reshape(-1).view(torch.uint8)), where
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), where
    else:
        assert actual == expected, where


def round_trip(state, tmp_path):
    """Save and load ``state``; also check the file is safetensors, not a pickle or zip."""
    path = save_state(state, tmp_path / "state.safetensors")
    data = path.read_bytes()
    assert not data.startswith(b"PK")  # torch.save's zip archive
    # A safetensors file opens with its header's u64 length, then the JSON header. (Its first
    # byte may happen to be 0x80, so "not a pickle" is checked as "is this layout".)
    header_len = int.from_bytes(data[:8], "little")
    assert json.loads(data[8:8 + header_len])["__metadata__"]["format"] == FORMAT
    loaded = load_state(path)
    assert_same(loaded, state)
    return loaded


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def train(model: nn.Module, optimizer, scheduler, steps: range) -> None:
    """One step per index, on a batch that depends only on the index."""
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 4, generator=generator)
        targets = torch.randn(8, 2, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                           weight_decay=1e-4)


def adam(model: nn.Module, amsgrad: bool = False) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), amsgrad=amsgrad)


def decay(epoch: int) -> float:
    return 0.9 ** epoch


def test_sgd_state_round_trips(tmp_path):
    model = make_model()
    optimizer = sgd(model)
    train(model, optimizer, None, range(3))
    loaded = round_trip(optimizer.state_dict(), tmp_path)
    assert set(loaded["state"]) == {0, 1, 2, 3}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_round_trips(tmp_path, amsgrad):
    model = make_model()
    optimizer = adam(model, amsgrad)
    train(model, optimizer, None, range(3))
    loaded = round_trip(optimizer.state_dict(), tmp_path)
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.99)
    assert loaded["state"][0]["step"].shape == ()


def test_lambda_lr_state_round_trips(tmp_path):
    model = make_model()
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    train(model, optimizer, scheduler, range(4))
    round_trip(scheduler.state_dict(), tmp_path)  # no tensors at all


def test_grad_scaler_state_round_trips(tmp_path):
    model = make_model()
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    state = scaler.state_dict()
    assert state["_growth_tracker"] == 1
    round_trip(state, tmp_path)


def test_awkward_values_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        0: "int key", "0": "str key beside it", "a/b": torch.ones(1), "a": {"b": torch.zeros(1)},
        "floats": [0.1, -0.0, 1e300, 5e-324, float("inf"), float("-inf"), float("nan")],
        "scalars": (None, True, False, 0, -(2 ** 70), "", "ünï/cødé"),
        "nested": [(), [], {}, ([1], (2.0,)), {1: {2: (3,)}}],
        "tensors": {
            "zero_dim": torch.tensor(3.0),
            "empty": torch.empty(0, 3, dtype=torch.int64),
            "view": base[1], "transposed": base.t(), "base": base,  # shared storage
            **{str(dtype): torch.arange(6).reshape(2, 3).to(dtype)
               for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int8,
                             torch.uint8, torch.int32, torch.bool, torch.complex64)},
            "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        },
    }
    round_trip(state, tmp_path)


@pytest.mark.parametrize("make_optimizer", [sgd, adam])
def test_resumed_training_is_bit_identical(tmp_path, make_optimizer):
    def setup(seed):
        model = make_model(seed)
        optimizer = make_optimizer(model)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, decay)

    uninterrupted = setup(seed=0)
    train(*uninterrupted, range(8))

    first = setup(seed=0)
    train(*first, range(5))
    model, optimizer, scheduler = first
    save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp_path / "resume.safetensors")

    model, optimizer, scheduler = resumed = setup(seed=1)  # other weights: all must come from disk
    state = load_state(tmp_path / "resume.safetensors")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    train(*resumed, range(5, 8))

    for p_resumed, p_uninterrupted in zip(model.parameters(), uninterrupted[0].parameters()):
        assert torch.equal(p_resumed, p_uninterrupted)
    assert scheduler.get_last_lr() == uninterrupted[2].get_last_lr()


def test_unsupported_value_raises_type_error_naming_its_path(tmp_path):
    with pytest.raises(TypeError, match="function at 'lr_lambdas/0'"):
        save_state({"lr_lambdas": [decay]}, tmp_path / "state.safetensors")
    with pytest.raises(TypeError, match="float key 1.5 at 'state'"):
        save_state({"state": {1.5: 0}}, tmp_path / "state.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def write_foreign(path, kind: str) -> None:
    if kind == "not safetensors":
        path.write_bytes(b"hello, not a safetensors file")
    elif kind == "no format":
        save_file({"x": torch.ones(2)}, str(path))
    elif kind == "other format":
        save_file({"x": torch.ones(2)}, str(path), metadata={"format": "collabsurgery.backbone/1"})
    elif kind == "corrupt structure":
        save_file({"x": torch.ones(2)}, str(path), metadata={"format": FORMAT, "structure": "{"})
    elif kind == "truncated":
        save_state({"t": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:-200])


@pytest.mark.parametrize("kind", ["missing", "not safetensors", "no format", "other format",
                                  "corrupt structure", "truncated"])
def test_foreign_file_raises_user_error(tmp_path, kind):
    path = tmp_path / "state.safetensors"
    write_foreign(path, kind)
    with pytest.raises(UserError) as err:
        load_state(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
