# Two set-up commands: `make demo` and `make test`. They create/refresh .venv/ (and, for the tests, .venv-label/) idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mome-installed
# MONAI Label's own venv (see `label` below)
LABEL_VENV := .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python
LABEL_STAMP := $(LABEL_VENV)/.mome-installed
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

test: $(STAMP) $(LABEL_STAMP)
	$(RUN_ENV) $(PY) -m pytest

demo: $(STAMP)
	$(RUN_ENV) $(PY) -m app.cli.demo --workdir .demo

# MONAI Label (label/): its own venv, as MONAI Label 0.8.5 needs pydicom 2 and the application pydicom 3. sam2 (a
# MONAI Label dependency that MoME does not use) is built against the installed CPU torch, without CUDA.
# `make label-serve STUDIES=DIR|DICOMWEB_URL [PORT=8000]` serves the MoME tasks to 3D Slicer / OHIF on 127.0.0.1.
PORT ?= 8000
.PHONY: label label-serve bench-label

label: $(LABEL_STAMP)

$(LABEL_STAMP): label/requirements.txt
	@test -x $(LABEL_PY) || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(LABEL_PY) -m pip install --quiet "$(TORCH_SPEC)"
	SAM2_BUILD_CUDA=0 $(LABEL_PY) -m pip install --quiet --no-build-isolation -c label/requirements.txt "sam2>=0.4.1"
	$(LABEL_PY) -m pip install --quiet -r label/requirements.txt
	@touch $(LABEL_STAMP)

# bench-label: the MONAI Label tasks over HTTP (a folder and, with Orthanc, a DICOMweb datastore), median of 3 per task (~5 min); bench/results/label_latency.md.
bench-label: $(STAMP) $(LABEL_STAMP)
	$(RUN_ENV) $(PY) bench/label_latency.py --repeats $(BENCH_REPEATS)

# pacs-demo: Orthanc and mome-worker on loopback, the demo study sent by C-STORE, the results shown, both stopped.
# bench-pacs: time from the last C-STORE to the results in Orthanc, median of 3; bench/results/pacs_latency.md.
.PHONY: pacs-demo bench-pacs
pacs-demo: $(STAMP)
	$(RUN_ENV) $(PY) -m worker.demo --workdir .pacs-demo

bench-pacs: $(STAMP)
	$(RUN_ENV) $(PY) bench/pacs_latency.py --repeats $(BENCH_REPEATS)

label-serve: $(LABEL_STAMP)
	@test -n "$(STUDIES)" || { echo "usage: make label-serve STUDIES=DIR|DICOMWEB_URL [PORT=8000]" >&2; exit 2; }
	MONAI_LABEL_SESSIONS=false PYTHONPATH="$(CURDIR)" $(LABEL_PY) -m monailabel.main start_server --app label --studies "$(STUDIES)" \
		--host 127.0.0.1 --port $(PORT) --conf bundle "$(CURDIR)/bundle"

# Benchmarks; results (JSON + Markdown) in bench/results/. Interrupted training runs continue where they stopped.
# bench-cpu: the whole DICOM -> SEG pipeline per inference profile and stage, demo and release-size models (~1.5 h
# on 2 cores); bench-levers: one MoME forward per CPU lever (~20 min); bench-quality: fast vs parity labels on held-out
# synthetic cases (~30 min); bench-loader: training batch preparation with and without background threads, against a
# simulated GPU step (~5 min); bench-training: the shipped demo MoME vs a U-Net trained with the compute of the demo's
# whole training chain (bench/results/training_cost.md: 5,300 U-Net iterations, 3-20 h on 2 CPU cores; resumable,
# BENCH_MINUTES=100 stops it and keeps its state in bench/results/mome_vs_unet/; the finished weights are kept there).
BENCH_REPEATS ?= 3
QUALITY_DATA := .bench/quality_seed1
.PHONY: bench-cpu bench-levers bench-quality bench-loader bench-training bench-robustness
bench: bench-cpu bench-levers bench-quality bench-loader bench-training bench-robustness

bench-cpu: $(STAMP)
	$(RUN_ENV) $(PY) bench/cpu_profiles.py --models demo release --profiles fast parity --repeats $(BENCH_REPEATS) --release-repeats 1 \
		--release-whole-volume

bench-levers: $(STAMP)
	$(PY) bench/cpu_levers.py --arch release --levers baseline inference_mode lean_gate channels_last

$(QUALITY_DATA)/dataset.json: | $(STAMP)
	cd bundle && PYTHONPATH=. ../$(PY) -m scripts.synthetic --out ../$(QUALITY_DATA) --cases 24 --seed 1 --quiet

bench-quality: $(QUALITY_DATA)/dataset.json
	PYTHONPATH=bundle $(PY) bench/profile_agreement.py --data $(QUALITY_DATA) --model bundle \
		--profiles parity fast --per-modality 2 \
		--variant step0.75 0.75 1.0 --variant scale1.33 0.75 1.33 --variant whole_volume 1.0 inf \
		--out bench/results/profile_agreement.json

bench-loader: $(QUALITY_DATA)/dataset.json
	$(PY) bench/loader_threads.py --data $(QUALITY_DATA) --out bench/results/loader_threads.json

# bench-robustness: every case of the robustness corpus (tests/robustness_corpus.py) through `python -m app` with the
# demo model, signals included (~10 min on 2 cores); bench/results/robustness.md.
bench-robustness: $(STAMP)
	$(RUN_ENV) $(PY) bench/robustness.py --workdir .bench/robustness

BENCH_MINUTES ?=
bench-training: $(STAMP)
	@test -f bench/results/training_cost.json || ($(RUN_ENV) $(PY) bench/training_cost.py --workdir .bench/cost)
	$(RUN_ENV) $(PY) bench/mome_vs_unet.py --workdir .bench \
		$(if $(BENCH_MINUTES),--minutes $(BENCH_MINUTES) --keep-state)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .demo .bench .pytest_cache .ruff_cache
