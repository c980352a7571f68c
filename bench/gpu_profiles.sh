#!/bin/bash
# The prepared GPU benchmark (issue 6): whole pipeline on CUDA, release-size MoME (random weights) and the demo
# model, fast and parity, 3 repeats each. Run from the repository root on a machine with an NVIDIA GPU after
# `make venv` with a CUDA build of torch; writes bench/results/gpu_profiles.{json,md}. About 5 minutes.
set -euo pipefail
ulimit -s 32768 2>/dev/null || true
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY bench/cpu_profiles.py --device cuda --models release demo --profiles fast parity --repeats 3 --release-repeats 3 \
    --out bench/results/gpu_profiles.json
