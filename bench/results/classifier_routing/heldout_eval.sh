#!/bin/bash
# Held-out evaluation of the demo MoME before (0.5.0) and after the classifier-routing fine-tune, side by side:
# every case of 20 held-out subjects (seed 1), whole volumes, nnU-Net tiling (`fast`), one thread per model.
set -e
cd "$(dirname "$0")/../../.."
W=$(cd .train6 && pwd)
for name in before after; do
  rm -rf $W/bundle_$name && cp -r bundle $W/bundle_$name
done
cp $W/start.pt $W/bundle_before/models/model.pt
sed -i 's/"modality_classifier": true/"modality_classifier": false/' $W/bundle_before/configs/inference.json
cp $W/${NAME:-route_ft}/model.pt $W/bundle_after/models/model.pt
sed -i 's/"modality_classifier": false/"modality_classifier": true/' $W/bundle_after/configs/inference.json
for name in before after; do
  OMP_NUM_THREADS=1 .venv/bin/mome-eval --data $W/data_seed1 --model $W/bundle_$name --profile fast \
    --device cpu --out $W/eval_$name.json > $W/eval_$name.log 2>&1 &
done
wait
