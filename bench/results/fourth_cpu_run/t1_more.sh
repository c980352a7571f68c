#!/bin/bash
# Fourth run, probe: does the T1 expert keep improving? 60 more epochs x 25 iterations on 64^3 patches from the
# experts64.sh T1 expert, lr 2e-4 poly, sampling seed 4, one thread. Resumable: re-run this script.
set -e
cd "$(dirname "$0")/../../../bundle"
W=$(cd ../.train7 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1}
out=$W/experts/t1_more; mkdir -p $out
nice -n 10 ../.venv/bin/python -m monai.bundle run --config_file configs/train_expert.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 4 --progress False --foreground_fraction 0.5 --patch_size '[64, 64, 64]' \
  --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
  --network "\$(lambda n: (n.load_state_dict(torch.load('$W/experts/t1/model.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
  --expert_modality t1 --output_dir $out --epochs 60 --iterations_per_epoch 25 --learning_rate 0.0002 >> $out/train.log 2>&1
