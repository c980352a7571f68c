#!/bin/bash
# Rebuilds the shipped demo weights from a clean checkout: bundle/models/model.pt (demo MoME 0.9.0) and
# bundle/models/model_plus.pt (demo MoME+ 0.6.0), stage by stage as the CPU runs that made them (README.md beside this
# script), then evaluates the rebuilt and the shipped weights side by side on the held-out seed and compares them with
# the figures in bench/results/mome_vs_unet.json and momeplus_patterns.json.
#
#   bench/recipes/demo_weights.sh [WORK]     # WORK (or env WORK): work folder, default .bench/demo_weights
#
# Env: PY (default .venv/bin/python), EVAL (default mome-eval beside PY). Hours on 2 CPU cores (9-14 h in all, see
# README.md). Resumable: rerun the same command; finished stages are skipped and an interrupted stage continues from
# its last epoch. The results are WORK/model.pt and WORK/model_plus.pt; bundle/models/ is never written. Exit status
# 1 when a rebuilt Dice is more than 0.02 from the shipped weights' on the same machine.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=${1:-${WORK:-$REPO/.bench/demo_weights}}
mkdir -p "$W" && W=$(cd "$W" && pwd)
PY=$(realpath -s "${PY:-$REPO/.venv/bin/python}")  # absolute (the recipe changes folder), not resolved out of the venv
EVAL=${EVAL:-$(dirname "$PY")/mome-eval}
cd "$REPO/bundle"
export PYTHONPATH=$PWD

ADAMW='$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)'
ROUTING='$torch.optim.AdamW(scripts.training.routing_groups(@network, 10), lr=@learning_rate, weight_decay=3e-5)'
P64='[64, 64, 64]'
D0=$W/data/seed0 D1=$W/data/seed1 D3=$W/data/seed3
# Stages up to 0.7.0 and MoME+ 0.6.0 ran in float32 (before cpu_bf16 existed); 0.8.0 and 0.9.0 with the configs'
# default, bfloat16 autocast on CPUs with native bf16 (float32 elsewhere).
FP32=(--cpu_bf16 False)

say() { echo "[$(date +%H:%M:%S)] $*"; }

# --network override: the config's network_def with a state dict loaded (as the runs wrote it)
load() { echo "\$(lambda n: (n.load_state_dict(torch.load('$1', weights_only=True)), n)[1])(@network_def).to(@device)"; }

epochs_logged() { cat "$1/train_log.jsonl" 2> /dev/null | grep -c . || true; }

# train CONFIG OUT EPOCHS_EXPECTED THREADS [override ...]: one bundle training run, skipped once OUT's log holds
# EPOCHS_EXPECTED epochs; otherwise started or resumed (the trainer continues from OUT/checkpoint_latest.pt).
train() {
  local config=$1 out=$2 expected=$3 threads=$4
  shift 4
  if [ "$(epochs_logged "$out")" -ge "$expected" ]; then
    say "done: $out"
    return 0
  fi
  mkdir -p "$out"
  say "training $out ($expected epochs; log $out/train.log)"
  OMP_NUM_THREADS=$threads "$PY" -m monai.bundle run --config_file "configs/$config" --bundle_root . \
    --progress False --foreground_fraction 0.5 --iterations_per_epoch 25 --output_dir "$out" "$@" \
    >> "$out/train.log" 2>&1 || { say "FAILED: $out (see $out/train.log; rerun to resume)"; return 1; }
}

# lanes 'CMD; CMD' 'CMD' ...: each argument runs in the background (its commands one after the other), as the runs'
# one-thread lanes did; fails if any lane failed, after all have ended.
lanes() {
  local pids=() failed=0 pid
  for lane in "$@"; do
    (eval "$lane") &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  return $failed
}

data() {  # data OUT SUBJECTS SEED [generator options]
  local out=$1 cases=$2 seed=$3
  shift 3
  [ -f "$out/dataset.json" ] && return 0
  say "generating $out"
  "$PY" -m scripts.synthetic --out "$out" --cases "$cases" --seed "$seed" --quiet "$@"
}

keep() {  # keep SRC DEST: a stage's best-EMA weights as the next stage's start
  [ -f "$2" ] || cp "$1" "$2"
}

# ---- data (generator 1.4 writes the same single-contrast data as 1.2, which made the 0.5.0 stages) -------------------
data "$D0" 120 0
data "$D3" 160 3 --modalities t1 t1ce --lesion-types glioma=0.35,stroke_chronic=0.3,wmh=0.35
data "$D1" 20 1
mkdir -p "$W/weights"

# ---- 0.5.0: five experts from scratch (48^3), joint MoME, gate fine-tune ----------------------------------------------
V=$W/mome_0.5.0
expert48() {
  train train_expert.json "$V/experts/$1" 100 1 "${FP32[@]}" --dataset_dir "$D0" --seed 0 --optimizer "$ADAMW" \
    --expert_modality "$1" --epochs 100 --learning_rate 0.001
}
lanes 'expert48 t1; expert48 t2; expert48 dwi' 'expert48 t1ce; expert48 flair'
E=$V/experts
EXPERTS="['$E/t1/model.pt', '$E/t1ce/model.pt', '$E/t2/model.pt', '$E/flair/model.pt', '$E/dwi/model.pt']"
# The joint run was planned as 30 epochs (10 of gate warm-up) and shortened to 18 (8) after 6 epochs; the trainer
# resumed with the new schedule, so its first 6 epochs followed the 30-epoch learning-rate decay. Both parts:
if [ "$(epochs_logged "$V/joint")" -lt 6 ]; then
  train train.json "$V/joint" 6 2 "${FP32[@]}" --dataset_dir "$D0" --seed 0 --optimizer "$ADAMW" \
    --expert_checkpoints "$EXPERTS" --epochs 30 --gate_warmup_epochs 10 --max_iterations 150 --learning_rate 0.0005
fi
train train.json "$V/joint" 18 2 "${FP32[@]}" --dataset_dir "$D0" --seed 0 --optimizer "$ADAMW" \
  --expert_checkpoints "$EXPERTS" --epochs 18 --gate_warmup_epochs 8 --learning_rate 0.0005
train train.json "$V/gate" 9 2 "${FP32[@]}" --dataset_dir "$D0" --seed 1 --optimizer "$ADAMW" \
  --network "$(load "$V/joint/model.pt")" --epochs 10 --gate_warmup_epochs 9 --max_iterations 225 --learning_rate 0.001
keep "$V/gate/model.pt" "$W/weights/0.5.0.pt"

# ---- MoME+ 0.6.0: experts from 0.5.0's T1/T1ce/T2/FLAIR experts (fresh 4-class heads), 12 x 100 iterations --------
if [ ! -f "$W/model_plus.pt" ]; then
  say "training $W/momeplus_0.6.0/mome_plus (12 epochs; log there)"
  (cd "$REPO" && OMP_NUM_THREADS=1 "$PY" bench/momeplus_patterns.py --workdir "$W/momeplus_0.6.0" --only mome_plus \
    --init-from-demo --demo-model "$W/weights/0.5.0.pt" --cpu-bf16 false --epochs 12 --iterations 100 \
    --test-subjects 6)
  cp "$W/momeplus_0.6.0/mome_plus/model.pt" "$W/model_plus.pt"
fi

# ---- 0.7.0: modality classifier + routing on 0.5.0 (classifier warm-up 2,000 steps, then 20 x 25, experts frozen) -----
train train.json "$W/mome_0.7.0/gate" 20 2 "${FP32[@]}" --dataset_dir "$D0" --seed 1 --modality_classifier True \
  --optimizer "$ROUTING" --network "\$scripts.training.load_extending(@network_def, '$W/weights/0.5.0.pt').to(@device)" \
  --epochs 21 --gate_warmup_epochs 20 --max_iterations 500 --learning_rate 0.001 --classifier_warmup_steps 2000
keep "$W/mome_0.7.0/gate/model.pt" "$W/weights/0.7.0.pt"

# ---- 0.8.0: T1/T1ce/T2 experts of 0.7.0 on 64^3 patches, then gate/classifier/routing on 64^3 -------------------------
V=$W/mome_0.8.0
[ -f "$V/init/t2.pt" ] || "$PY" -m scripts.checkpoints extract "$W/weights/0.7.0.pt" "$V/init" t1 t1ce t2
expert64() {
  train train_expert.json "$V/experts/$1" "$2" 1 --dataset_dir "$D0" --seed 2 --patch_size "$P64" \
    --optimizer "$ADAMW" --network "$(load "$V/init/$1.pt")" --expert_modality "$1" --epochs "$2" \
    --learning_rate 0.0005
}
lanes 'expert64 t1 200' 'expert64 t1ce 160' 'expert64 t2 120'
[ -f "$V/assembled.pt" ] || "$PY" -m scripts.checkpoints replace "$W/weights/0.7.0.pt" "$V/assembled.pt" \
  t1="$V/experts/t1/model.pt" t1ce="$V/experts/t1ce/model.pt" t2="$V/experts/t2/model.pt"
train train.json "$V/gate" 20 2 --dataset_dir "$D0" --seed 3 --modality_classifier True --patch_size "$P64" \
  --optimizer "$ROUTING" --network "$(load "$V/assembled.pt")" --epochs 21 --gate_warmup_epochs 20 \
  --max_iterations 500 --learning_rate 0.0005
keep "$V/gate/model.pt" "$W/weights/0.8.0.pt"

# ---- 0.9.0: T1/T1ce experts of 0.8.0 on seed 0 + seed 3 (64^3), then gate/classifier/routing as for 0.8.0 ----------
V=$W/mome_0.9.0
[ -f "$V/init/t1ce.pt" ] || "$PY" -m scripts.checkpoints extract "$W/weights/0.8.0.pt" "$V/init" t1 t1ce
expert64more() {
  train train_expert.json "$V/experts/$1" 150 1 --dataset_json "['$D0/dataset.json', '$D3/dataset.json']" \
    --seed 4 --split_seed 2 --patch_size "$P64" --optimizer "$ADAMW" --network "$(load "$V/init/$1.pt")" \
    --expert_modality "$1" --epochs 150 --learning_rate 0.0003
}
lanes 'expert64more t1' 'expert64more t1ce'
[ -f "$V/assembled.pt" ] || "$PY" -m scripts.checkpoints replace "$W/weights/0.8.0.pt" "$V/assembled.pt" \
  t1="$V/experts/t1/model.pt" t1ce="$V/experts/t1ce/model.pt"
train train.json "$V/gate" 20 2 --dataset_dir "$D0" --seed 3 --modality_classifier True --patch_size "$P64" \
  --optimizer "$ROUTING" --network "$(load "$V/assembled.pt")" --epochs 21 --gate_warmup_epochs 20 \
  --max_iterations 500 --learning_rate 0.0005
keep "$V/gate/model.pt" "$W/weights/0.9.0.pt"
keep "$W/weights/0.9.0.pt" "$W/model.pt"

# ---- held-out evaluation: rebuilt and shipped weights side by side (mome-eval --profile fast, one thread each) --------
bundle_copy() {  # bundle_copy DIR MODEL MODEL_PLUS
  [ -f "$1/models/model_plus.pt" ] && return 0
  rm -rf "$1" && mkdir -p "$1/models"
  cp -r "$REPO/bundle/configs" "$REPO/bundle/scripts" "$1/"
  cp "$2" "$1/models/model.pt" && cp "$3" "$1/models/model_plus.pt"
}
bundle_copy "$W/eval/bundle_rebuilt" "$W/model.pt" "$W/model_plus.pt"
bundle_copy "$W/eval/bundle_shipped" "$REPO/bundle/models/model.pt" "$REPO/bundle/models/model_plus.pt"
evaluate() {  # evaluate NAME DATA OUT_STEM
  [ -f "$W/eval/$3.json" ] && return 0
  OMP_NUM_THREADS=1 "$EVAL" --data "$2" --model "$W/eval/bundle_$1" --profile fast --device cpu \
    --out "$W/eval/$3.json" > "$W/eval/$3.log" 2>&1
}
say "evaluating on held-out seed 1 (logs in $W/eval)"
lanes 'evaluate rebuilt "$D1" mome_rebuilt' 'evaluate shipped "$D1" mome_shipped'
lanes 'evaluate rebuilt "$W/momeplus_0.6.0/plus_seed1" plus_rebuilt' \
  'evaluate shipped "$W/momeplus_0.6.0/plus_seed1" plus_shipped'

"$PY" - "$REPO" "$W" << 'EOF'
import hashlib
import json
import sys
from pathlib import Path

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
TOLERANCE = 0.02  # the bar the reproducibility checks of the shipped chain used
load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
sha = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]  # noqa: E731
worst = 0.0


def table(title, names, summary, shipped, rebuilt, judged):
    global worst
    print(f"\n{title}\n{'':<18} {'summary':>8} {'shipped':>8} {'rebuilt':>8} {'diff':>7}")
    for name in [*names, "mean"]:
        values = [sum(d.values()) / len(d) if name == "mean" else d[name] for d in (summary, shipped, rebuilt)]
        if name in judged:
            worst = max(worst, abs(values[2] - values[1]))
        print(f"{name:<18} {values[0]:>8.3f} {values[1]:>8.3f} {values[2]:>8.3f} {values[2] - values[1]:>+7.3f}")


modalities = ["dwi", "t1", "t1ce", "t2", "flair"]
summary = load(repo / "bench/results/mome_vs_unet.json")["splits"]["seed1"]["mome"]
runs = {k: load(work / f"eval/mome_{k}.json")["per_modality"] for k in ("shipped", "rebuilt")}
table(
    "Demo MoME, held-out seed 1 (44 cases), Dice per modality (summary: bench/results/mome_vs_unet.json)",
    modalities,
    {m: summary[m]["dice"] for m in modalities},
    *({m: runs[k][m]["dice"] for m in modalities} for k in ("shipped", "rebuilt")),
    judged=[*modalities, "mean"],
)
plus = load(repo / "bench/results/momeplus_patterns.json")["summary"]["per_pattern"]
runs = {k: load(work / f"eval/plus_{k}.json")["per_pattern"] for k in ("shipped", "rebuilt")}
patterns = list(plus)
table(
    "Demo MoME+, held-out seed 1 (6 subjects), mean of the BraTS region Dice per availability pattern "
    "(summary: bench/results/momeplus_patterns.json)",
    patterns,
    {p: plus[p]["mome_plus"]["mean"] for p in patterns},
    *({p: runs[k][p]["dice_regions"] for p in patterns} for k in ("shipped", "rebuilt")),
    judged=["mean"],  # 6 subjects per pattern: only the mean over the 15 patterns is judged
)
for name in ("model.pt", "model_plus.pt"):
    shipped, rebuilt = sha(repo / "bundle/models" / name), sha(work / name)
    note = "equal" if shipped == rebuilt else "differ: training repeats statistically, not bitwise, across machines"
    print(f"sha256 {name}: shipped {shipped}, rebuilt {rebuilt} ({note})")
verdict = "within" if worst <= TOLERANCE else "OUTSIDE"
print(f"\nlargest |rebuilt - shipped| (modality means, means): {worst:.3f}, {verdict} the +-{TOLERANCE} tolerance")
sys.exit(0 if worst <= TOLERANCE else 1)
EOF
