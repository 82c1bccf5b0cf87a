# Set-up and the two jobs a new user runs. Only Python >= 3.10 is needed beforehand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -e ".[test,tensorboard,onnx]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## train CL-ILR and its single-model baseline on the built-in digits, export, reload
	$(BIN)/collabsurgery demo --recipe recipes/demo.yaml

test: $(STAMP)  ## the whole test suite, both tiers (CPU only)
	$(BIN)/python -m pytest -q -m "slow or not slow"

test-fast: $(STAMP)  ## the fast tier alone: unit and contract tests (what a bare pytest runs)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs/demo-* runs/detection-* .pytest_cache
