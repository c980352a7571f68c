#!/bin/bash
# Fifth run, stage 1: the T1 and T1ce experts of demo MoME 0.8.0 fine-tuned on 64^3 patches of the training data
# (seed 0) plus an extra T1/T1ce dataset (seed 3: 160 subjects, lesion mix glioma 0.35, chronic stroke 0.30,
# WMH 0.35), bfloat16 autocast on CPUs with native bf16, two lanes with one thread each on two cores.
# OUT / EXPERTS / THREADS: output folder under <work> (default experts), experts to train, threads per lane.
# Start: demo MoME 0.8.0 (models/model.pt of commit f27eace, written to <repo>/.train8/start.pt). Resumable.
set -e
cd "$(dirname "$0")/../../../bundle"
mkdir -p ../.train8 && W=$(cd ../.train8 && pwd)
[ -f $W/start.pt ] || git show f27eace:bundle/models/model.pt > $W/start.pt
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1}
PY=../.venv/bin/python
ASSEMBLE=../bench/results/fourth_cpu_run/assemble.py
for m in t1 t1ce; do
  [ -f $W/init/$m.pt ] || $PY $ASSEMBLE extract $W $W/start.pt $m
done
[ -f $W/data_seed0/dataset.json ] || $PY -m scripts.synthetic --out $W/data_seed0 --cases 120 --seed 0 --quiet
[ -f $W/data_seed3/dataset.json ] || $PY -m scripts.synthetic --out $W/data_seed3 --cases 160 --seed 3 --quiet \
  --modalities t1 t1ce --lesion-types glioma=0.35,stroke_chronic=0.3,wmh=0.35
expert() {
  m=$1; epochs=$2; out=$W/${OUT:-experts}/$m; mkdir -p $out
  [ -f $out/model_final.pt ] && return 0
  $PY -m monai.bundle run --config_file configs/train_expert.json --bundle_root . \
    --dataset_json "['$W/data_seed0/dataset.json', '$W/data_seed3/dataset.json']" \
    --seed 4 --split_seed 2 --progress False --foreground_fraction 0.5 --patch_size '[64, 64, 64]' \
    --optimizer '$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)' \
    --network "\$(lambda n: (n.load_state_dict(torch.load('$W/init/$m.pt', weights_only=True)), n)[1])(@network_def).to(@device)" \
    --expert_modality $m --output_dir $out --epochs $epochs --iterations_per_epoch 25 \
    --learning_rate ${LR:-0.0003} >> $out/train.log 2>&1
}
for m in ${EXPERTS:-t1 t1ce}; do
  expert $m ${EPOCHS:-150} &
done
wait
