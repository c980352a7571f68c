#!/bin/bash
# Gate-only fine-tuning of the shipped demo MoME (0.5.0) with the gate routing prior (gate_routing_weight).
set -e
cd "$(dirname "$0")/../../../bundle"
mkdir -p ../.train5 && W=$(cd ../.train5 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1}
[ -f $W/data_seed0/dataset.json ] || ../.venv/bin/python -m scripts.synthetic --out $W/data_seed0 --cases 120 --seed 0 --quiet
[ -f $W/data_seed1/dataset.json ] || ../.venv/bin/python -m scripts.synthetic --out $W/data_seed1 --cases 10 --seed 1 --quiet
cp -n models/model.pt $W/start.pt
out=$W/${NAME:-route_ft}; mkdir -p $out
../.venv/bin/python -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 1 --progress False --foreground_fraction 0.5 \
  --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
  --network "\$(lambda n: (n.load_state_dict(torch.load('$W/start.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
  --output_dir $out --epochs 10 --gate_warmup_epochs 9 --max_iterations 225 --iterations_per_epoch 25 \
  --learning_rate 0.001 --gate_routing_weight ${LAMBDA:-1.0} >> $out/train.log 2>&1
