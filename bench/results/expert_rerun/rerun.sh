#!/bin/bash
# Reruns a 0.5.0 expert stage (third_cpu_run/lanes.sh recipe, one thread) on today's code: rerun.sh flair dwi
set -e
cd "$(dirname "$0")/../../../bundle"
W=../.repro
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=../.venv/bin/python
[ -f $W/data_seed0/dataset.json ] || $PY -m scripts.synthetic --out $W/data_seed0 --cases 120 --seed 0 --quiet
for m in "$@"; do
  $PY -m monai.bundle run --config_file configs/train_expert.json --bundle_root . \
    --dataset_dir $W/data_seed0 --seed 0 --progress False --foreground_fraction 0.5 \
    --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
    --expert_modality $m --output_dir $W/$m --epochs 100 --iterations_per_epoch 25 --learning_rate 0.001 \
    > $W/$m.log 2>&1 &
done
wait
