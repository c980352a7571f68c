"""Trains the demo MoME and an equal-compute universal U-Net on synthetic data and compares them on held-out seeds.

Steps (each skipped when its output exists, so an interrupted run continues):

1. synthetic data: training set (``--train-seed``) and held-out test set (``--test-seed``);
2. five experts, one per modality (``configs/train_expert.json``);
3. joint MoME with the curriculum (``configs/train.json``);
4. a single U-Net of about the same parameter count on all modalities, given the same training compute: its
   iteration count is the MoME recipe's measured CPU seconds divided by its own measured seconds per iteration;
5. ``mome-eval`` of both on the test set; results JSON + Markdown in ``bench/results/``.

``--parallel`` runs the MoME chain and the U-Net side by side with one thread each (equal hardware, same wall time).
The MoME's ``model.pt`` is the bundle's demo model; ``--export-demo`` copies it to ``bundle/models/model.pt``.

Usage (from the repository root, inside the venv)::

    python bench/mome_vs_unet.py --workdir .train [--parallel] [--export-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")
RESULTS = REPO / "bench" / "results"

# The demo recipe (see bundle/docs/README.md); override on the command line.
DEFAULTS = {
    "train_subjects": 120,
    "test_subjects": 24,
    "train_seed": 0,
    "test_seed": 1,
    "expert_epochs": 32,
    "expert_iterations": 25,
    "expert_lr": 0.001,
    "joint_epochs": 20,
    "gate_warmup_epochs": 6,
    "joint_iterations": 25,
    "joint_lr": 0.001,
    "optimizer": "adamw",
    "foreground_fraction": 0.5,
    "unet_features": [20, 40, 80, 156],
    "seed": 0,
}


def _env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _bundle_run(config: str, overrides: dict, log: Path, threads: int | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}", "--bundle_root", "."]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "a")
    return subprocess.Popen(args, cwd=BUNDLE, env=_env(threads), stdout=handle, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, what: str) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode}); see its log.")


def generate(workdir: Path, seed: int, subjects: int) -> Path:
    out = workdir / f"data_seed{seed}"
    if not (out / "dataset.json").is_file():
        cmd = [sys.executable, "-m", "scripts.synthetic", "--out", str(out), "--cases", str(subjects)]
        subprocess.run([*cmd, "--seed", str(seed), "--quiet"], cwd=BUNDLE, env=_env(None), check=True)
    return out


OPTIMIZERS = {
    "sgd": None,  # the configs' default: SGD, Nesterov, momentum 0.99, weight decay 3e-5 (upstream)
    "adamw": "$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)",
}


def _common(cfg: dict, data: Path) -> dict:
    overrides = {"dataset_dir": str(data), "seed": cfg["seed"], "progress": "False"}
    overrides["foreground_fraction"] = cfg["foreground_fraction"]
    if OPTIMIZERS[cfg["optimizer"]]:
        overrides["optimizer"] = OPTIMIZERS[cfg["optimizer"]]
    return overrides


def train_experts(cfg: dict, workdir: Path, data: Path, threads: int | None) -> list[Path]:
    paths = []
    for modality in MODALITIES:
        out = workdir / "experts" / modality
        if not (out / "model_final.pt").is_file():
            overrides = {
                **_common(cfg, data),
                "expert_modality": modality,
                "output_dir": str(out),
                "epochs": cfg["expert_epochs"],
                "iterations_per_epoch": cfg["expert_iterations"],
                "learning_rate": cfg["expert_lr"],
            }
            _wait(_bundle_run("train_expert.json", overrides, out / "train.log", threads), f"expert {modality}")
        paths.append(out / "model.pt")
    return paths


def train_mome(cfg: dict, workdir: Path, data: Path, experts: list[Path], threads: int | None) -> Path:
    out = workdir / "mome"
    if not (out / "model_final.pt").is_file():
        overrides = {
            **_common(cfg, data),
            "output_dir": str(out),
            "expert_checkpoints": [str(p) for p in experts],
            "epochs": cfg["joint_epochs"],
            "iterations_per_epoch": cfg["joint_iterations"],
            "learning_rate": cfg["joint_lr"],
            "gate_warmup_epochs": cfg["gate_warmup_epochs"],
        }
        _wait(_bundle_run("train.json", overrides, out / "train.log", threads), "joint MoME")
    return out


def train_unet(cfg: dict, workdir: Path, data: Path, iterations: int, threads: int | None) -> Path:
    out = workdir / "unet"
    if not (out / "model_final.pt").is_file():
        per_epoch = cfg["joint_iterations"]
        overrides = {
            **_common(cfg, data),
            "train_modalities": list(MODALITIES),
            "features_per_stage": cfg["unet_features"],
            "output_dir": str(out),
            "epochs": max(1, round(iterations / per_epoch)),
            "iterations_per_epoch": per_epoch,
            "learning_rate": cfg["expert_lr"],
        }
        _wait(_bundle_run("train_expert.json", overrides, out / "train.log", threads), "universal U-Net")
    return out


def seconds_per_iteration(features: list[int] | None, mome: bool, threads: int | None) -> float:
    """Median seconds of one training iteration (batch 2, bundle patch size) after two warm-up steps."""
    code = f"""
import json, time, statistics, torch
from monai.bundle import ConfigParser
from scripts.networks import MoME
from scripts.training import build_unet
from scripts.losses import MoMELoss, nnunet_deep_supervision_loss
p = ConfigParser(); p.read_config('configs/train.json')
keys = ['features_per_stage', 'kernel_sizes', 'strides', 'n_conv_per_stage', 'n_conv_per_stage_decoder']
topo = {{k: p[k] for k in keys}}
if {features!r}: topo['features_per_stage'] = {features!r}
net = MoME(5, 1, 2, **topo) if {mome} else build_unet(1, 2, **topo)
net.train().to(memory_format=torch.channels_last_3d)
levels = len(topo['features_per_stage']) - 1
loss_fn = MoMELoss(levels) if {mome} else nnunet_deep_supervision_loss(levels)
opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
x = torch.randn(2, 1, *p['patch_size']).contiguous(memory_format=torch.channels_last_3d)
y = (torch.rand(2, 1, *p['patch_size']) > 0.9).float()
times = []
for i in range(6):
    t = time.perf_counter(); out = net(x)
    loss = loss_fn(out, y, torch.tensor([0, 3]), 0.5)['loss'] if {mome} else loss_fn(out, y)
    opt.zero_grad(); loss.backward(); opt.step(); times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times[2:])))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=BUNDLE, env=_env(threads), capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def make_eval_bundle(model_dir: Path, target: Path, features: list[int] | None, unet: bool) -> Path:
    """A runnable bundle (template configs and scripts) with the trained weights; a U-Net variant for the baseline."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("models", "training", "__pycache__", "data"))
    (target / "models").mkdir()
    shutil.copy2(model_dir / "model.pt", target / "models" / "model.pt")
    config_path = target / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    if features:
        config["features_per_stage"] = features
    if unet:
        arguments = ("in_channels", "num_classes", "features_per_stage", "kernel_sizes", "strides")
        arguments += ("n_conv_per_stage", "n_conv_per_stage_decoder")
        config["network_def"] = {"_target_": "scripts.training.build_unet", **{k: f"@{k}" for k in arguments}}
    config_path.write_text(json.dumps(config, indent=4))
    return target


def evaluate(bundle: Path, data: Path, out: Path) -> dict:
    if not out.is_file():
        cmd = [sys.executable, "-m", "app.cli_eval", "--data", str(data), "--model", str(bundle), "--out", str(out)]
        subprocess.run(cmd, cwd=REPO, env={**os.environ}, check=True)
    return json.loads(out.read_text())


def _train_seconds(model_dir: Path) -> float:
    log = model_dir / "train_log.jsonl"
    return sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip())


def summary_markdown(report: dict) -> str:
    lines = [
        "# Demo MoME vs equal-compute universal U-Net (synthetic data, held-out seed)",
        "",
        f"Machine: {report['machine']}. Training: {report['training']}.",
        "",
        "| modality | n | MoME Dice | U-Net Dice | difference |",
        "|---|---|---|---|---|",
    ]
    mome, unet = report["mome"]["per_modality"], report["unet"]["per_modality"]
    for modality in MODALITIES:
        if modality in mome:
            a, b = mome[modality]["dice"], unet[modality]["dice"]
            lines.append(f"| {modality} | {mome[modality]['n']} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    a, b = report["mome"]["mean_dice"], report["unet"]["mean_dice"]
    lines.append(f"| **mean of modalities** | | **{a:.3f}** | **{b:.3f}** | **{a - b:+.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".train")
    parser.add_argument("--parallel", action="store_true", help="MoME and U-Net side by side, one thread each")
    parser.add_argument("--export-demo", action="store_true", help="copy the MoME model to bundle/models/model.pt")
    for key, value in DEFAULTS.items():
        many = isinstance(value, list)
        kind = int if many else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=value, nargs="+" if many else None)
    args = parser.parse_args(argv)
    cfg = {key: getattr(args, key) for key in DEFAULTS}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.parallel else None

    train_data = generate(workdir, cfg["train_seed"], cfg["train_subjects"])
    test_data = generate(workdir, cfg["test_seed"], cfg["test_subjects"])
    timing_file = workdir / "timing.json"
    if not timing_file.is_file():
        timing = {
            "expert_s_per_it": seconds_per_iteration(None, False, threads),
            "mome_s_per_it": seconds_per_iteration(None, True, threads),
            "unet_s_per_it": seconds_per_iteration(cfg["unet_features"], False, threads),
            "threads": threads or "default",
        }
        mome_cost = len(MODALITIES) * cfg["expert_epochs"] * cfg["expert_iterations"] * timing["expert_s_per_it"]
        # Gate warm-up iterations cost about half a joint one; counting them in full favours the U-Net.
        mome_cost += cfg["joint_epochs"] * cfg["joint_iterations"] * timing["mome_s_per_it"]
        timing["mome_recipe_s"] = mome_cost
        timing["unet_iterations"] = int(round(mome_cost / timing["unet_s_per_it"]))
        timing_file.write_text(json.dumps(timing, indent=1))
    timing = json.loads(timing_file.read_text())
    print(f"timing: {timing}", flush=True)

    started = time.time()
    unet_thread = None
    if args.parallel:  # the U-Net trains in a subprocess while this thread runs the MoME chain
        unet_args = (cfg, workdir, train_data, timing["unet_iterations"], 1)
        unet_thread = threading.Thread(target=train_unet, args=unet_args)
        unet_thread.start()
    experts = train_experts(cfg, workdir, train_data, threads)
    mome_dir = train_mome(cfg, workdir, train_data, experts, threads)
    if unet_thread is not None:
        unet_thread.join()
    unet_dir = train_unet(cfg, workdir, train_data, timing["unet_iterations"], threads)
    wall = time.time() - started

    mome_bundle = make_eval_bundle(mome_dir, workdir / "bundle_mome", None, unet=False)
    unet_bundle = make_eval_bundle(unet_dir, workdir / "bundle_unet", cfg["unet_features"], unet=True)
    mome_eval = evaluate(mome_bundle, test_data, workdir / "eval_mome.json")
    unet_eval = evaluate(unet_bundle, test_data, workdir / "eval_unet.json")

    def digest(result: dict) -> dict:
        per_modality = {m: {"n": v["n"], "dice": v["dice"]} for m, v in result["per_modality"].items()}
        return {"per_modality": per_modality, "mean_dice": result["overall"]["mean_of_group_means"]["dice"]}

    mome_train = sum(_train_seconds(workdir / "experts" / m) for m in MODALITIES) + _train_seconds(mome_dir)
    report = {
        "machine": f"{os.cpu_count()} CPU cores, threads per run: {threads or 'default'}",
        "training": (
            f"MoME = 5 experts x {cfg['expert_epochs'] * cfg['expert_iterations']} it + joint "
            f"{cfg['joint_epochs'] * cfg['joint_iterations']} it ({mome_train:.0f} s); U-Net "
            f"{cfg['unet_features']} {timing['unet_iterations']} it ({_train_seconds(unet_dir):.0f} s)"
        ),
        "config": cfg,
        "timing": timing,
        "wall_s": wall,
        "mome": digest(mome_eval),
        "unet": digest(unet_eval),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mome_vs_unet.json").write_text(json.dumps(report, indent=1))
    markdown = summary_markdown(report)
    (RESULTS / "mome_vs_unet.md").write_text(markdown)
    print(markdown)
    if args.export_demo:
        shutil.copy2(mome_dir / "model.pt", BUNDLE / "models" / "model.pt")
        print(f"demo model -> {BUNDLE / 'models' / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
