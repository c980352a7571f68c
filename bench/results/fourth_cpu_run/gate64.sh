#!/bin/bash
# Fourth run, stage 2: gate, modality classifier and routing layers of the assembled model (0.7.0 + the 64^3 experts)
# fine-tuned on 64^3 patches with the experts frozen (gate warm-up epochs only), two threads, bf16 autocast where
# native. Resumable: re-run this script.
set -e
cd "$(dirname "$0")/../../../bundle"
W=$(cd ../.train7 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-2}
PY=../.venv/bin/python
[ -f $W/assembled.pt ] || $PY ../bench/results/fourth_cpu_run/assemble.py replace $W $W/start.pt t1 t1ce t2
out=$W/${NAME:-gate64}; mkdir -p $out
EPOCHS=${EPOCHS:-20}
$PY -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed 3 --progress False --foreground_fraction 0.5 --modality_classifier True \
  --patch_size '[64, 64, 64]' \
  --optimizer "\$torch.optim.AdamW(scripts.training.routing_groups(@network, ${ROUTING_LR_SCALE:-10}), lr=@learning_rate, weight_decay=3e-5)" \
  --network "\$(lambda n: (n.load_state_dict(torch.load('$W/assembled.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
  --output_dir $out --epochs $((EPOCHS + 1)) --gate_warmup_epochs $EPOCHS --max_iterations $((EPOCHS * 25)) \
  --iterations_per_epoch 25 --learning_rate ${LR:-0.0005} >> $out/train.log 2>&1
