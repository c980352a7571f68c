#!/bin/bash
# Joint MoME stage of the third run (resumable: re-run this script).
set -e
cd "$(dirname "$0")/../bundle"
W=$(cd ../.train3 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-2}
out=$W/mome; mkdir -p $out
E=$W/experts
nice -n 5 ../.venv/bin/python -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 0 --progress False --foreground_fraction 0.5 \
  --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
  --expert_checkpoints "[\"$E/t1/model.pt\", \"$E/t1ce/model.pt\", \"$E/t2/model.pt\", \"$E/flair/model.pt\", \"$E/dwi/model.pt\"]" \
  --output_dir $out --epochs ${EPOCHS:-30} --gate_warmup_epochs ${WARMUP:-10} --iterations_per_epoch 25 \
  --learning_rate ${LR:-0.0005} >> $out/train.log 2>&1
