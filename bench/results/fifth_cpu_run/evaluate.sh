#!/bin/bash
# Evaluations of the fifth run: every case of the validation split (seed 2, 20 subjects, 65 cases) and of the
# held-out split (seed 1, 20 subjects, 44 cases), whole volumes, `mome-eval --profile fast` (bf16 where native),
# 64^3 tiles, one thread per run, two runs side by side. MODELS: <work>/<name>/model.pt weights of stage 2 runs
# (default `gate`), each copied into <work>/bundle_<name>.
set -e
cd "$(dirname "$0")/../../.."
W=$(cd .train8 && pwd)
for seed in 1 2; do
  [ -f $W/data_seed$seed/dataset.json ] || (cd bundle && PYTHONPATH=. ../.venv/bin/python -m scripts.synthetic \
    --out $W/data_seed$seed --cases 20 --seed $seed --quiet)
done
for name in ${MODELS:-gate}; do
  if [ ! -d $W/bundle_$name ]; then
    cp -r bundle $W/bundle_$name && rm -rf $W/bundle_$name/training && cp $W/$name/model.pt $W/bundle_$name/models/model.pt
  fi
  for data in ${SPLITS:-seed2 seed1}; do
    OMP_NUM_THREADS=1 .venv/bin/mome-eval --data $W/data_$data --model $W/bundle_$name --profile fast \
      --device cpu --out $W/eval_${name}_$data.json > $W/eval_${name}_$data.log 2>&1 &
  done
done
wait
