# One-command set-up: `make demo` and `make test` create .venv and install what is needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test test-full bench bench-full clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Install the pinned CPU build only when no torch is importable: an unpinned
	# install would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/ckptguard demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-full: venv
	CKPTGUARD_TEST_FULL=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: venv
	$(BIN)/python benchmarks/run.py --quick
	$(BIN)/python benchmarks/incremental.py --quick

bench-full: venv
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/incremental.py
	$(BIN)/python benchmarks/checksums.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
