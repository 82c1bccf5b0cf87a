"""README.md works as written: its ``bash`` blocks run, in order, in a clean directory.

The commands are run exactly as README.md shows them; only the epochs and sizes are cut, through
the documented ``COLLABSURGERY_OVERRIDES`` environment variable (every recipe command appends its
``key=value`` items; ``detection.<option>=value`` items go to finetune-detection). A block that
cannot run here (several GPUs, a dataset on disk, hours of training) is preceded in README.md by
``<!-- readme-test: skip (why) -->``; ``make test`` (this suite itself) is the only line left out
of a block. ``make demo`` runs against the environment running the tests.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- readme-test: skip \(([^)]*)\) -->\s*\n)?```bash\n(.*?)```", re.S)
OVERRIDES = ("train.epochs=1 data.max_train_examples=128 data.image_size=12 "
             "detection.epochs=1 detection.max_steps=4")
#: lines README shows that the tests do not run: the test suite itself
NOT_RUN = ("make test",)


def readme_blocks(text: str) -> list[tuple[str | None, str]]:
    """README's bash blocks in order: (why it is skipped or None, its text)."""
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def commands(block: str) -> list[str]:
    """The commands of a block, one per line (continuation lines joined, blank lines and
    whole-line comments left out)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")
            and line.split("#")[0].strip() not in NOT_RUN]


def test_readme_starts_with_the_two_commands_of_a_new_user():
    skipped, first = readme_blocks((REPO / "README.md").read_text())[0]
    assert skipped is None
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make demo", "make test"]


def _clean_directory(root: Path) -> dict[str, str]:
    """A directory with what README's commands read (recipes, tools, the Makefile), and the
    environment: this Python's scripts first on PATH, make's venv this one (its stamp fresh),
    accelerate's configuration and caches inside ``root``."""
    for name in ("recipes", "tools"):
        shutil.copytree(REPO / name, root / name)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    venv = root / ".test-venv"
    venv.mkdir()
    (venv / "bin").symlink_to(Path(sys.executable).parent)
    (venv / ".installed").touch()
    bin_dir = Path(sys.executable).parent  # not the link: python finds its venv from there
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "VENV": str(venv), "HF_HOME": str(root / "hf"), "COLLABSURGERY_OVERRIDES": OVERRIDES,
           "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": os.environ.get(
               "XDG_CACHE_HOME", str(Path.home() / ".cache"))}
    env.pop("RANK", None)
    return env


def test_readme_commands_run_in_order(tmp_path):
    env = _clean_directory(tmp_path)
    ran = 0
    for skipped, block in readme_blocks((REPO / "README.md").read_text()):
        if skipped:
            continue
        for command in commands(block):
            done = subprocess.run(["bash", "-c", f"set -eo pipefail; {command}"], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, (f"README command failed: {command}\n"
                                          f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 15
