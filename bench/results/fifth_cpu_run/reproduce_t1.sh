#!/bin/bash
# Reproducibility probe of stage 1: the T1 expert retrained with the recorded command but two threads instead of one
# (different floating-point reduction order; `OUT=experts_rerun EXPERTS=t1 THREADS=2 experts.sh`), put into 0.9.0 in
# place of the shipped T1 expert (the gate is kept), and evaluated on the T1 cases of both splits next to the
# shipped model's numbers (`mome-eval --profile fast`, one thread per split).
set -e
cd "$(dirname "$0")/../../.."
W=$(cd .train8 && pwd)
if [ ! -d $W/bundle_rerun_t1 ]; then
  cp -r bundle $W/bundle_rerun_t1 && rm -rf $W/bundle_rerun_t1/training
  .venv/bin/python bench/results/fourth_cpu_run/assemble.py replace $W $W/bundle_rerun_t1/models/model.pt t1 \
    --experts experts_rerun --out $W/bundle_rerun_t1/models/model.pt
fi
for seed in 1 2; do
  cases=$(.venv/bin/python -c "import json; print(' '.join(c['case'] for c in json.load(open('$W/data_seed$seed/dataset.json'))['training'] if c['modality'] == 't1'))")
  OMP_NUM_THREADS=1 .venv/bin/mome-eval --data $W/data_seed$seed --model $W/bundle_rerun_t1 --profile fast --device cpu \
    --cases $cases --out $W/eval_rerun_t1_seed$seed.json > $W/eval_rerun_t1_seed$seed.log 2>&1 &
done
wait
