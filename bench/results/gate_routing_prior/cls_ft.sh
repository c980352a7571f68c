#!/bin/bash
# Gate (+ new modality classifier) fine-tuning of the shipped demo MoME 0.5.0: experts frozen, 9 x 25 iterations.
set -e
cd "$(dirname "$0")/../../../bundle"
W=$(cd ../.train5 && pwd)  # data_seed0 and start.pt as made by route_ft.sh
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1}
out=$W/${NAME:-cls_ft}; mkdir -p $out
../.venv/bin/python -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 1 --progress False --foreground_fraction 0.5 --modality_classifier True \
  --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
  --network "\$scripts.training.load_extending(@network_def, '$W/start.pt').to(@device)" \
  --output_dir $out --epochs 10 --gate_warmup_epochs 9 --max_iterations 225 --iterations_per_epoch 25 \
  --learning_rate 0.001 --gate_routing_weight ${LAMBDA:-1.0} --classifier_warmup_steps ${WARMUP:-300} >> $out/train.log 2>&1
