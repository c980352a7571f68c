# Two set-up commands: `make demo` and `make test`. Both create/refresh .venv/ idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mome-installed
TORCH_SPEC ?= torch==2.13.0
# Holoscan wants a 32 MB stack; quiet GXF logs.
RUN_ENV := ulimit -s 32768 2>/dev/null; HOLOSCAN_LOG_LEVEL=ERROR

.PHONY: venv test demo bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest

demo: $(STAMP)
	$(RUN_ENV) $(PY) -m app.demo --workdir .demo

# Trains the demo MoME and an equal-compute U-Net on synthetic data and evaluates both;
# results in bench/results/. Interrupted runs continue where they stopped. About 5 hours on 2 cores (the held-out
# evaluation with nnU-Net tiling is a large part of it).
bench: $(STAMP)
	$(RUN_ENV) $(PY) bench/mome_vs_unet.py --workdir .bench --parallel

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .demo .bench .pytest_cache .ruff_cache
