#!/bin/bash
# Gate fine-tuning of the third run's joint MoME: experts frozen, gate trained on the fused loss (9 epochs x 25 it).
set -e
cd "$(dirname "$0")/../bundle"
W=$(cd ../.train3 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-2}
out=$W/gate_ft; mkdir -p $out
../.venv/bin/python -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 1 --progress False --foreground_fraction 0.5 \
  --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
  --network "\$(lambda n: (n.load_state_dict(torch.load('$W/mome/model.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
  --output_dir $out --epochs 10 --gate_warmup_epochs 9 --max_iterations 225 --iterations_per_epoch 25 \
  --learning_rate 0.001 >> $out/train.log 2>&1
