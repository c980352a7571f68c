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
that copy. Once all epochs are done, the kept copy is only the evaluated weights and the log (the optimiser state is
dropped), and a run that starts from it goes straight to the evaluation. Evaluations already in the work folder are
reused unless the weights are newer.

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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))
from scripts.networks import MODALITIES  # noqa: E402  (the bundle's expert order)

RESULTS = REPO / "bench" / "results"
STATE = RESULTS / "mome_vs_unet"
STATE_FILES = ("checkpoint_latest.pt", "train_log.jsonl", "model.pt")
FINISHED_STATE_FILES = ("train_log.jsonl", "model.pt")  # the evaluated weights and their record; no resume needed
METRICS = ("dice", "abs_volume_error_ml", "lesion_f1")
EXPECTED_MEAN_GAIN = 0.02  # issue 3: MoME at least 2 Dice points better on the mean, and no modality worse
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
    """Copies a kept state (resume state, or the finished run) into a work folder without one; True when it did."""
    kept = [name for name in STATE_FILES if (STATE / name).is_file()]
    if any((out / name).is_file() for name in STATE_FILES) or not kept:
        return False
    out.mkdir(parents=True, exist_ok=True)
    for name in kept:
        shutil.copy2(STATE / name, out / name)
    return True


def keep_state(out: Path, finished: bool = False) -> None:
    """Copies the resume state to ``STATE``; once ``finished``, only the weights and the log (no optimiser state)."""
    STATE.mkdir(parents=True, exist_ok=True)
    for name in FINISHED_STATE_FILES if finished else STATE_FILES:
        if (out / name).is_file():
            shutil.copy2(out / name, STATE / name)
    if finished:
        (STATE / "checkpoint_latest.pt").unlink(missing_ok=True)


def training_log(out: Path) -> list[dict]:
    """The per-epoch records of the U-Net run in ``out`` (empty before its first epoch)."""
    log = out / "train_log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def is_finished(out: Path, epochs: int) -> bool:
    """True when the run in ``out`` has trained all ``epochs`` and its weights are there."""
    if (out / "model_final.pt").is_file():
        return True
    logged = {record["epoch"] for record in training_log(out)}
    return (out / "model.pt").is_file() and logged >= set(range(epochs))


def train_unet(train_data: list[Path], out: Path, iterations: int, threads: int | None, minutes: float | None) -> bool:
    """Trains (or resumes) the U-Net; True when it has finished, False when ``minutes`` ran out first."""
    restored = restore_state(out)
    overrides = unet_overrides(train_data, out, iterations)
    epochs = overrides["epochs"]
    if is_finished(out, epochs):
        print(f"the U-Net has trained all {epochs} epochs{f' (kept in {STATE})' if restored else ''}", flush=True)
        return True
    if restored:
        print(f"resuming from the kept state in {STATE}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    args = _bundle_args("train_expert.json", overrides)
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
    """``mome-eval`` of ``bundle`` on ``data``; an earlier result in ``out`` is reused unless the weights are newer."""
    if not out.is_file() or out.stat().st_mtime < (bundle / "models" / "model.pt").stat().st_mtime:
        cmd = [sys.executable, "-m", "app.cli_eval", "--data", str(data), "--model", str(bundle), "--out", str(out)]
        cmd += ["--profile", "fast"]  # mome-eval picks CUDA when there is one
        subprocess.run(cmd, cwd=REPO, env=_env(threads), check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pooled(results: list[dict]) -> dict[str, dict]:
    """Per modality over several evaluations: case count and the mean of each metric over all their cases."""
    cases: dict[str, list[dict]] = {}
    for result in results:
        for case in result["per_case"]:
            cases.setdefault(case["modality"], []).append(case)
    summary = {}
    for modality, rows in cases.items():
        summary[modality] = {"n": len(rows)}
        for metric in METRICS:
            if all(metric in row for row in rows):
                summary[modality][metric] = sum(row[metric] for row in rows) / len(rows)
    return summary


def verdict(both: dict[str, dict]) -> dict:
    """Issue 3's expectation checked on one split: mean Dice gain, the worst modality and whether both hold."""
    gains = {m: both["mome"][m]["dice"] - both["unet"][m]["dice"] for m in MODALITIES if m in both["mome"]}
    mean_gain = sum(gains.values()) / len(gains)
    worst = min(gains, key=gains.get)
    met = mean_gain >= EXPECTED_MEAN_GAIN and gains[worst] >= 0
    return {"mean_gain": mean_gain, "worst_modality": worst, "worst_gain": gains[worst], "met": met}


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


def _dice_rows(split: str, both: dict[str, dict]) -> list[str]:
    rows, means = [], []
    for modality in MODALITIES:
        if modality in both["mome"]:
            a, b = both["mome"][modality]["dice"], both["unet"][modality]["dice"]
            means.append((a, b))
            rows.append(f"| {split} | {modality} | {both['mome'][modality]['n']} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    a, b = (sum(x) / len(means) for x in zip(*means))
    rows.append(f"| {split} | **mean of modalities** | | **{a:.3f}** | **{b:.3f}** | **{a - b:+.3f}** |")
    return rows


def _secondary_rows(both: dict[str, dict]) -> list[str]:
    """Lesion-volume error and lesion-wise detection F1 of both models, where the evaluations have them."""
    rows = []
    for modality in MODALITIES:
        mome, unet = both["mome"].get(modality, {}), both["unet"].get(modality, {})
        if all(metric in row for row in (mome, unet) for metric in METRICS[1:]):
            rows.append(
                f"| {modality} | {mome['abs_volume_error_ml']:.2f} | {unet['abs_volume_error_ml']:.2f} "
                f"| {mome['lesion_f1']:.3f} | {unet['lesion_f1']:.3f} |"
            )
    if not rows:
        return []
    header = ["", "Lesion-volume error and lesion-wise detection F1 (seeds 1 + 5, mean per case):", ""]
    header += ["| modality | MoME abs. volume error mL | U-Net | MoME lesion F1 | U-Net |", "|---|---|---|---|---|"]
    return header + rows


def _verdict_line(result: dict) -> str:
    outcome = "met" if result["met"] else "**not met**"
    return (
        f"Issue 3 expects MoME at least {EXPECTED_MEAN_GAIN * 100:.0f} Dice points better on the mean of modalities "
        f"and no modality worse; on seeds 1 + 5 this is {outcome}: mean {result['mean_gain']:+.3f}, smallest "
        f"difference {result['worst_gain']:+.3f} ({result['worst_modality']})."
    )


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
        lines += _dice_rows(split, both)
    if "verdict" in report:
        lines += ["", _verdict_line(report["verdict"])]
    if "seeds 1 + 5" in report["splits"]:
        lines += _secondary_rows(report["splits"]["seeds 1 + 5"])
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
    finished = train_unet(train_data, unet_dir, iterations, args.threads, args.minutes)
    if args.keep_state:
        keep_state(unet_dir, finished)
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

    log = training_log(unet_dir)
    trained = sum(record["iterations"] for record in log)
    best = max((r for r in log if r.get("best")), key=lambda r: r["epoch"], default=log[-1])
    report = {
        "machine": cost["machine"],
        "training": (
            f"demo MoME chain {cost['equal_compute']['chain_seconds']:,.0f} s priced on that machine "
            f"(bench/results/training_cost.md), worth {iterations:,} U-Net iterations; U-Net "
            f"{UNET['features_per_stage']} trained {trained:,} ({len(log)} epochs of {UNET['iterations_per_epoch']}), "
            f"evaluated with its best-EMA weights (epoch {best['epoch'] + 1}, EMA pseudo-Dice {best['ema_dice']:.3f})"
        ),
        "unet": UNET,
        "unet_iterations_priced": iterations,
        "unet_iterations_trained": trained,
        "unet_weights_epoch": best["epoch"] + 1,
        "unet_training_s_logged": round(sum(record["seconds"] for record in log)),
        "splits": splits,
        "verdict": verdict(splits["seeds 1 + 5"]),
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
