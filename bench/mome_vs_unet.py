"""The shipped demo MoME against a universal U-Net trained with the same compute, on held-out synthetic seeds.

Issue 3's benchmark: a single U-Net of about the demo MoME's parameter count (features 20-40-80-156: 2,144,654
parameters; the demo MoME 2,137,045) is trained on all five contrasts of the same synthetic data as the demo MoME
(seed 0, 120 subjects, plus seed 3, 160 T1/T1ce subjects), for as many iterations as cost the same as the whole
training chain of the demo MoME (``bench/training_cost.py`` prices it on one machine; ``bench/demo_chain.json``
lists the stages). Both are then evaluated with ``mome-eval --profile fast`` on held-out seeds that no training or
choice has seen (seeds 1 and 5, 20 subjects each), and the per-modality Dice is reported side by side, with where
each model's errors fall: missed lesion, and false positives at the lesion border or by tissue elsewhere
(``bench/errors_by_tissue.py``).

The U-Net's recipe is the experts' from-scratch recipe: AdamW lr 1e-3, poly decay, batch 2, foreground oversampling
0.5, 64^3 patches (the demo's inference tile), bfloat16 autocast where the CPU computes it natively.

The training takes hours on a CPU and is resumable at every epoch. ``--minutes M`` stops it after M minutes (the
epoch in flight is lost); ``--keep-state`` then copies the resume state into ``bench/results/mome_vs_unet/`` so a
later session (whose work folder is new) can continue from it: a run with no state in its work folder starts from
that copy.

Usage (repository root, inside the venv)::

    python bench/training_cost.py                      # once per machine: the equal-compute iteration count
    python bench/mome_vs_unet.py --workdir .bench [--minutes 100 --keep-state]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")
RESULTS = REPO / "bench" / "results"
STATE = RESULTS / "mome_vs_unet"
STATE_FILES = ("checkpoint_latest.pt", "train_log.jsonl", "model.pt")
ADAMW = "$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)"

# name -> (seed, subjects, extra generator arguments): the demo MoME's training data and the held-out test seeds.
TRAIN_DATA = {
    "data_seed0": (0, 120, []),
    "data_seed3": (3, 160, ["--modalities", "t1", "t1ce", "--lesion-types", "glioma=0.35,stroke_chronic=0.3,wmh=0.35"]),
}
TEST_DATA = {"data_seed1": (1, 20, []), "data_seed5": (5, 20, [])}
UNET = {
    "features_per_stage": [20, 40, 80, 156],
    "patch_size": [64, 64, 64],
    "learning_rate": 0.001,
    "iterations_per_epoch": 25,
    "foreground_fraction": 0.5,
    "seed": 0,
    "split_seed": 2,
}


def _env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def generate(workdir: Path, name: str, spec: tuple) -> Path:
    seed, subjects, extra = spec
    out = workdir / name
    if not (out / "dataset.json").is_file():
        cmd = [sys.executable, "-m", "scripts.synthetic", "--out", str(out), "--cases", str(subjects)]
        subprocess.run([*cmd, "--seed", str(seed), "--quiet", *extra], cwd=BUNDLE, env=_env(None), check=True)
    made = json.loads((out / "dataset.json").read_text()).get("generator", {})
    if (made.get("seed"), made.get("subjects")) != (seed, subjects):
        raise SystemExit(
            f"{out} holds seed {made.get('seed')} with {made.get('subjects')} subjects, but this benchmark needs seed "
            f"{seed} with {subjects}: move it away (another benchmark made it) and run again."
        )
    return out


def unet_overrides(train_data: list[Path], out: Path, iterations: int) -> dict:
    """``train_expert.json`` overrides that train the universal U-Net on all modalities of ``train_data``."""
    epochs = max(1, round(iterations / UNET["iterations_per_epoch"]))
    return {
        "dataset_json": repr([str(d / "dataset.json") for d in train_data]),
        "train_modalities": "$@modalities",
        "optimizer": ADAMW,
        "output_dir": str(out),
        "epochs": epochs,
        "progress": "False",
        **{key: value for key, value in UNET.items()},
    }


def _bundle_args(config: str, overrides: dict) -> list[str]:
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}", "--bundle_root", "."]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def restore_state(out: Path) -> bool:
    """Copies a kept resume state into an empty work folder; True when it did."""
    if (out / "checkpoint_latest.pt").is_file() or not (STATE / "checkpoint_latest.pt").is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        if (STATE / name).is_file():
            shutil.copy2(STATE / name, out / name)
    return True


def keep_state(out: Path) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        if (out / name).is_file():
            shutil.copy2(out / name, STATE / name)


def train_unet(train_data: list[Path], out: Path, iterations: int, threads: int | None, minutes: float | None) -> bool:
    """Trains (or resumes) the U-Net; True when it has finished, False when ``minutes`` ran out first."""
    if (out / "model_final.pt").is_file():
        return True
    if restore_state(out):
        print(f"resuming from the kept state in {STATE}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    args = _bundle_args("train_expert.json", unet_overrides(train_data, out, iterations))
    with open(out / "train.log", "a") as log:
        process = subprocess.Popen(args, cwd=BUNDLE, env=_env(threads), stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=None if minutes is None else minutes * 60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
            return False
    if process.returncode != 0:
        raise SystemExit(f"U-Net training failed (exit {process.returncode}); see {out / 'train.log'}.")
    return True


def make_eval_bundle(model: Path, target: Path) -> Path:
    """A runnable copy of the bundle whose network is the U-Net, with its trained weights."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("models", "training", "__pycache__", "data"))
    (target / "models").mkdir()
    shutil.copy2(model, target / "models" / "model.pt")
    config_path = target / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["features_per_stage"] = UNET["features_per_stage"]
    arguments = ("in_channels", "num_classes", "features_per_stage", "kernel_sizes", "strides")
    arguments += ("n_conv_per_stage", "n_conv_per_stage_decoder")
    config["network_def"] = {"_target_": "scripts.training.build_unet", **{k: f"@{k}" for k in arguments}}
    config_path.write_text(json.dumps(config, indent=4))
    return target


def evaluate(bundle: Path, data: Path, out: Path, threads: int | None) -> dict:
    if not out.is_file():
        cmd = [sys.executable, "-m", "app.cli_eval", "--data", str(data), "--model", str(bundle), "--out", str(out)]
        cmd += ["--profile", "fast"]  # mome-eval picks CUDA when there is one
        subprocess.run(cmd, cwd=REPO, env=_env(threads), check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pooled(results: list[dict]) -> dict[str, dict]:
    """Per modality over several evaluations: case count and mean Dice over all their cases."""
    dice: dict[str, list[float]] = {}
    for result in results:
        for case in result["per_case"]:
            dice.setdefault(case["modality"], []).append(case["dice"])
    return {m: {"n": len(v), "dice": sum(v) / len(v)} for m, v in dice.items()}


def _errors_by_tissue():
    """``bench/errors_by_tissue.py``, imported only when a report needs it (it loads the bundle's scripts)."""
    sys.path.insert(0, str(REPO / "bench"))
    import errors_by_tissue

    return errors_by_tissue


def tissue_errors(evaluations: dict[str, list[tuple[Path, dict]]]) -> dict[str, dict]:
    """Per model: where its errors fall (``bench/errors_by_tissue.py``), pooled over its evaluated datasets."""
    errors_by_tissue = _errors_by_tissue()
    summary = {}
    for model, evaluated in evaluations.items():
        per_case = []
        for data, result in evaluated:
            per_case += errors_by_tissue.analyse(data, Path(result["predictions"]))["per_case"]
        summary[model] = errors_by_tissue.per_modality(per_case)
    return summary


def tissue_markdown(summary: dict[str, dict]) -> list[str]:
    """The error table of both models, one row per modality and model."""
    errors_by_tissue = _errors_by_tissue()
    lines = [
        "",
        "Where the errors fall (seeds 1 + 5, mean mL per case; `bench/errors_by_tissue.py`): found and missed lesion,",
        "false positives within 2 voxels of the lesion (border) or farther away by tissue.",
        "",
        *errors_by_tissue.TABLE_HEADER,
    ]
    for modality in MODALITIES:
        for model in ("mome", "unet"):
            if modality in summary.get(model, {}):
                lines += errors_by_tissue.table_rows({modality: summary[model][modality]}, model)
    return lines


def summary_markdown(report: dict) -> str:
    lines = [
        "# Demo MoME vs an equal-compute universal U-Net (synthetic data, held-out seeds)",
        "",
        f"Machine: {report['machine']}. Training: {report['training']}.",
        "",
        "| split | modality | n | MoME Dice | U-Net Dice | difference |",
        "|---|---|---|---|---|---|",
    ]
    for split, both in report["splits"].items():
        means = []
        for modality in MODALITIES:
            if modality in both["mome"]:
                a, b = both["mome"][modality]["dice"], both["unet"][modality]["dice"]
                means.append((a, b))
                n = both["mome"][modality]["n"]
                lines.append(f"| {split} | {modality} | {n} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
        a, b = (sum(x) / len(means) for x in zip(*means))
        lines.append(f"| {split} | **mean of modalities** | | **{a:.3f}** | **{b:.3f}** | **{a - b:+.3f}** |")
    if "errors_by_tissue" in report:
        lines += tissue_markdown(report["errors_by_tissue"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of training and evaluation")
    parser.add_argument("--cost", type=Path, default=RESULTS / "training_cost.json", help="bench/training_cost.py")
    parser.add_argument("--minutes", type=float, default=None, help="stop the training after this many minutes")
    parser.add_argument("--keep-state", action="store_true", help=f"copy the resume state to {STATE}")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.cost.is_file():
        raise SystemExit(f"{args.cost} is missing: run bench/training_cost.py first.")
    cost = json.loads(args.cost.read_text())
    iterations = int(cost["equal_compute"]["unet_iterations"])

    train_data = [generate(workdir, name, spec) for name, spec in TRAIN_DATA.items()]
    test_data = {name: generate(workdir, name, spec) for name, spec in TEST_DATA.items()}
    unet_dir = workdir / "unet_equal_compute"
    started = time.time()
    finished = train_unet(train_data, unet_dir, iterations, args.threads, args.minutes)
    if args.keep_state:
        keep_state(unet_dir)
    if not finished:
        print(f"stopped after {args.minutes} min; run again to continue (state kept: {args.keep_state})")
        return 0

    unet_bundle = make_eval_bundle(unet_dir / "model.pt", workdir / "bundle_unet")
    splits: dict[str, dict] = {}
    results: dict[str, list[dict]] = {"mome": [], "unet": []}
    evaluations: dict[str, list[tuple[Path, dict]]] = {"mome": [], "unet": []}
    for name, data in test_data.items():
        both = {}
        for model, bundle in (("mome", BUNDLE), ("unet", unet_bundle)):
            result = evaluate(bundle, data, workdir / f"eval_{model}_{name}.json", args.threads)
            results[model].append(result)
            evaluations[model].append((data, result))
            both[model] = pooled([result])
        splits[name.replace("data_", "")] = both
    splits["seeds 1 + 5"] = {model: pooled(values) for model, values in results.items()}

    report = {
        "machine": cost["machine"],
        "training": (
            f"demo MoME chain {cost['equal_compute']['chain_seconds']:,.0f} s priced on that machine "
            f"(bench/results/training_cost.md); U-Net {UNET['features_per_stage']} {iterations:,} iterations"
        ),
        "unet": UNET,
        "unet_iterations": iterations,
        "wall_s_this_call": time.time() - started,
        "splits": splits,
        "errors_by_tissue": tissue_errors(evaluations),
    }
    STATE.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mome_vs_unet.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = summary_markdown(report)
    (RESULTS / "mome_vs_unet.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
