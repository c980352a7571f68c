#!/bin/bash
# Fifth run, stage 2: gate, modality classifier and routing layers of the assembled model (0.8.0 + stage 1's T1 and
# T1ce experts) fine-tuned on 64^3 patches of the training data (seed 0) with the experts frozen (gate warm-up epochs
# only), two threads, bf16 autocast where native. Same recipe as the fourth run's stage 2. Resumable.
set -e
cd "$(dirname "$0")/../../../bundle"
W=$(cd ../.train8 && pwd)
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-2}
PY=../.venv/bin/python
[ -f $W/assembled.pt ] || $PY ../bench/results/fourth_cpu_run/assemble.py replace $W $W/start.pt t1 t1ce
out=$W/${NAME:-gate}; mkdir -p $out
EPOCHS=${EPOCHS:-20}
$PY -m monai.bundle run --config_file configs/train.json --bundle_root . \
  --dataset_dir $W/data_seed0 --seed ${SEED:-3} --progress False --foreground_fraction 0.5 --modality_classifier True \
  --patch_size '[64, 64, 64]' \
  --optimizer "\$torch.optim.AdamW(scripts.training.routing_groups(@network, 10), lr=@learning_rate, weight_decay=3e-5)" \
  --network "\$(lambda n: (n.load_state_dict(torch.load('$W/assembled.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
  --output_dir $out --epochs $((EPOCHS + 1)) --gate_warmup_epochs $EPOCHS --max_iterations $((EPOCHS * 25)) \
  --iterations_per_epoch 25 --learning_rate 0.0005 >> $out/train.log 2>&1
