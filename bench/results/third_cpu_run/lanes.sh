#!/bin/bash
# Long expert recipe, two lanes with one thread each (resumable: re-run this script).
set -e
cd "$(dirname "$0")/../bundle"
W=$(cd ../.train3 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=../.venv/bin/python
[ -f $W/data_seed0/dataset.json ] || $PY -m scripts.synthetic --out $W/data_seed0 --cases 120 --seed 0 --quiet
expert() {
  m=$1; out=$W/experts/$m; mkdir -p $out
  [ -f $out/model_final.pt ] && return 0
  nice -n 10 $PY -m monai.bundle run --config_file configs/train_expert.json --bundle_root . \
    --dataset_dir $W/data_seed0 --seed 0 --progress False --foreground_fraction 0.5 \
    --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
    --expert_modality $m --output_dir $out --epochs ${EPOCHS:-100} --iterations_per_epoch 25 --learning_rate 0.001 \
    >> $out/train.log 2>&1
}
( expert t1; expert t2; expert dwi ) &
( expert t1ce; expert flair ) &
wait
