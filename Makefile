# One-command set-up: `make demo` and `make test` create .venv and install what each needs.
# `make demo` installs the project with the demo extra only; `make test` adds the test/dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEMO := $(VENV)/.installed-demo
DEV := $(VENV)/.installed-dev
TORCH_PIN := torch==2.13.0
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: venv demo test test-full lint bench bench-full clean

venv: $(DEV)

# The interpreter and torch. The pinned CPU build is installed only when no torch is importable:
# an unpinned install would pull a multi-GB CUDA build.
$(BASE):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_PIN)"
	touch $(BASE)

$(DEMO): $(BASE) pyproject.toml
	$(PIP) -e ".[demo]"
	touch $(DEMO)

# The test extras include the framework integrations' pinned versions (their tests run real
# Lightning, HF Trainer and Accelerate); `make demo` installs none of them.
$(DEV): $(BASE) pyproject.toml
	$(PIP) -e ".[dev,lightning,hf]"
	touch $(DEV)

demo: $(DEMO)
	$(BIN)/ckptguard demo

test: $(DEV)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-full: $(DEV)
	CKPTGUARD_TEST_FULL=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup

# ruff (rule set in pyproject.toml) and mypy --strict on src/ckptguard; .ci/run runs it after the tests.
lint: $(DEV)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: $(DEV)
	$(BIN)/python benchmarks/run.py --quick
	$(BIN)/python benchmarks/io_limits.py --quick
	$(BIN)/python benchmarks/incremental.py --quick
	$(BIN)/python benchmarks/distributed.py --quick
	$(BIN)/python benchmarks/tiers.py --quick --no-s3
	$(BIN)/python benchmarks/tiers_nodes.py --quick

bench-full: $(DEV)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/io_limits.py --output BENCHMARKS.md
	$(BIN)/python benchmarks/incremental.py
	$(BIN)/python benchmarks/checksums.py
	$(BIN)/python benchmarks/distributed.py --output BENCHMARKS.md
	$(BIN)/python benchmarks/tiers.py --output BENCHMARKS.md
	$(BIN)/python benchmarks/tiers_nodes.py --output BENCHMARKS.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
