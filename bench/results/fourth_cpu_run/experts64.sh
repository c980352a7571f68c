#!/bin/bash
# Fourth run, stage 1: the T1, T1ce and T2 experts of demo MoME 0.7.0 fine-tuned on 64^3 patches (bfloat16 autocast on
# CPUs with native bf16), three lanes with one thread each on two cores. Resumable: re-run this script.
# Start: the experts of demo MoME 0.7.0 (models/model.pt of commit ab09339, written to <repo>/.train7/start.pt).
set -e
cd "$(dirname "$0")/../../../bundle"
mkdir -p ../.train7 && W=$(cd ../.train7 && pwd)
[ -f $W/start.pt ] || git show ab09339:bundle/models/model.pt > $W/start.pt
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1}
PY=../.venv/bin/python
for m in t1 t1ce t2; do
  [ -f $W/init/$m.pt ] || $PY ../bench/results/fourth_cpu_run/assemble.py extract $W $W/start.pt $m
done
[ -f $W/data_seed0/dataset.json ] || $PY -m scripts.synthetic --out $W/data_seed0 --cases 120 --seed 0 --quiet
expert() {
  m=$1; epochs=$2; out=$W/experts/$m; mkdir -p $out
  [ -f $out/model_final.pt ] && return 0
  $PY -m monai.bundle run --config_file configs/train_expert.json --bundle_root . \
    --dataset_dir $W/data_seed0 --seed 2 --progress False --foreground_fraction 0.5 --patch_size '[64, 64, 64]' \
    --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
    --network "\$(lambda n: (n.load_state_dict(torch.load('$W/init/$m.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
    --expert_modality $m --output_dir $out --epochs $epochs --iterations_per_epoch 25 \
    --learning_rate ${LR:-0.0005} >> $out/train.log 2>&1
}
expert t1 200 &
expert t1ce 160 &
expert t2 120 &
wait
