#!/bin/bash
# Demo MoME 0.5.0 + modality classifier with routing bias (our extension): classifier warm-up, then the gate,
# classifier and routing layers trained on the fused loss with the experts frozen (gate warm-up epochs only).
set -e
cd "$(dirname "$0")/../../../bundle"
mkdir -p ../.train6 && W=$(cd ../.train6 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-2}
[ -f $W/data_seed0/dataset.json ] || ../.venv/bin/python -m scripts.synthetic --out $W/data_seed0 --cases 120 --seed 0 --quiet
[ -f $W/data_seed1/dataset.json ] || ../.venv/bin/python -m scripts.synthetic --out $W/data_seed1 --cases 20 --seed 1 --quiet
cp -n models/model.pt $W/start.pt
out=$W/${NAME:-route_ft}; mkdir -p $out
EPOCHS=${EPOCHS:-20}
../.venv/bin/python -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 1 --progress False --foreground_fraction 0.5 --modality_classifier True \
  --optimizer "\$torch.optim.AdamW(scripts.training.routing_groups(@network, ${ROUTING_LR_SCALE:-10}), lr=@learning_rate, weight_decay=3e-5)" \
  --network "\$scripts.training.load_extending(@network_def, '$W/start.pt').to(@device)" \
  --output_dir $out --epochs $((EPOCHS + 1)) --gate_warmup_epochs $EPOCHS --max_iterations $((EPOCHS * 25)) \
  --iterations_per_epoch 25 --learning_rate 0.001 --classifier_warmup_steps ${WARMUP:-2000} >> $out/train.log 2>&1
