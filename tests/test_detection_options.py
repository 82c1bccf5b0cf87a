"""``collabsurgery finetune-detection``'s options: --help states every default, and the
learning rate follows the batch size (torchvision's 0.02 for 16 images)."""
from __future__ import annotations

import argparse
import re

import pytest

from collabsurgery import cli
from collabsurgery.detection import add_arguments


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune-detection", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for option, default in (("--epochs EPOCHS", "10"), ("--batch-size BATCH_SIZE", "8"),
                            ("--momentum MOMENTUM", "0.9"), ("--weight-decay WEIGHT_DECAY",
                                                             "0.0001"),
                            ("--seed SEED", "0"), ("--num-workers NUM_WORKERS", "0"),
                            ("--warmup-steps WARMUP_STEPS", "100"),
                            ("--clip-grad-norm NORM", "10.0"), ("--log-every SECONDS", "30.0"),
                            ("--mixed-precision {no,bf16,fp16}", "no")):
        assert re.search(re.escape(option) + r" (?:(?! --).)*\(default " + re.escape(default) + r"\)",
                         text), option
    assert re.search(r"--lr LR SGD learning rate \(default 0\.00125 x the images per step over "
                     r"all processes: 0\.01 for batch size 8", text)


@pytest.mark.parametrize("argv,lr", [([], 0.01), (["--batch-size", "2"], 0.0025),
                                     (["--batch-size", "2", "--lr", "0.5"], 0.5)])
def test_learning_rate_follows_the_batch_size(argv, lr, tmp_path, monkeypatch):
    from collabsurgery.detection import command

    monkeypatch.setattr(command, "read_backbone", lambda path: {})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backbone", "b.safetensors", "--train", str(tmp_path), "--val",
                              str(tmp_path), *argv])
    config = command.config_from_args(args)
    assert config.lr == pytest.approx(lr) and config.clip_grad_norm == 10.0
    args.clip_grad_norm = 0.0
    assert command.config_from_args(args).clip_grad_norm is None
