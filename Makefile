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

# The CPU MAP image (Dockerfile; docker, else podman, else buildah): `make map` builds mome-app-cpu:VERSION from the
# packager's build context; `make map-run IN=STUDY OUT=DIR` runs it as a MAP runs (mounted input/output, no network).
# MAP_BASE picks the base image (default: the Dockerfile's python:3.12-slim); `make map-base` makes a minimal Debian
# one with debootstrap (root), for hosts that reach package indexes but no container registry. MAP_WHEELS: a folder
# of wheels mounted into the build, MAP_PIP_CERT: a CA bundle for pip in the build (default for both, `pip`: what
# this host's pip uses, if anything; podman/buildah only), MAP_NO_CACHE=1: no cached layers.
# map-check (CI, after `make test`): map-base, map, the image's tests (tests/map) and bench-map.
# bench-map: image size, build time, cold start and the demo study through the image; bench/results/map_image.md.
MAP_ENGINE ?= auto
MAP_BASE ?=
MAP_DEBIAN_BASE := localhost/mome-debian-base:bookworm
MAP_WHEELS ?= pip
MAP_PIP_CERT ?= pip
MAP_TAG = $(shell $(PY) -c 'from app.map_package.image import IMAGE_TAG; print(IMAGE_TAG)')
MAP_BUILD_ARGS = --engine $(MAP_ENGINE) $(if $(MAP_BASE),--base $(MAP_BASE)) $(if $(MAP_WHEELS),--wheels $(MAP_WHEELS)) \
	$(if $(MAP_PIP_CERT),--pip-cert $(MAP_PIP_CERT)) $(if $(MAP_NO_CACHE),--no-cache) --json build/map_build.json
.PHONY: map map-base map-run map-check bench-map

map: $(STAMP)
	$(PY) -m app.map_package build $(MAP_BUILD_ARGS)

map-base: $(STAMP)
	$(PY) -m app.map_package base --engine $(MAP_ENGINE) --tag $(MAP_DEBIAN_BASE)

map-run: $(STAMP)
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "usage: make map-run IN=study_folder OUT=output_folder" >&2; exit 2; }
	$(PY) -m app.map_package run --engine $(MAP_ENGINE) --input "$(IN)" --output "$(OUT)"

map-check: $(STAMP)
	$(MAKE) map-base
	$(MAKE) map MAP_BASE=$(MAP_DEBIAN_BASE)
	$(RUN_ENV) MOME_MAP_IMAGE=$(MAP_TAG) MOME_MAP_ENGINE=$(MAP_ENGINE) $(PY) -m pytest tests/map -p no:cacheprovider
	$(MAKE) bench-map

bench-map: $(STAMP)
	$(RUN_ENV) $(PY) bench/map_image.py --image $(MAP_TAG) --engine $(MAP_ENGINE) --build-record build/map_build.json \
		--repeats $(BENCH_REPEATS)

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
