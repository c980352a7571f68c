"""Prices the shipped demo MoME's training chain and the equal-compute U-Net baseline on one machine.

The demo MoME (``bundle/models/model.pt``) was trained by a chain of CPU runs over several sessions, on different
CPUs and precisions (``bench/demo_chain.json`` lists every stage and the log it came from). To give a universal U-Net
*the same compute*, each kind of training iteration of that chain is timed here, side by side on this machine, with
the bundle's own trainer (``scripts.training.Trainer``: patch sampling, augmentation, forward, losses, backward,
clipping, optimiser step) and the same precision and thread count for every kind. The chain's cost is the sum over its
stages of iterations x seconds per iteration, and the U-Net's budget is that cost divided by the U-Net's own seconds
per iteration. Validation passes are left out on both sides.

The iterations of all kinds are interleaved (round-robin, ``--rounds`` rounds after one warm-up round) so that a noisy
machine slows every kind alike; medians are reported.

Usage (repository root, inside the venv)::

    python bench/training_cost.py [--workdir .bench/cost] [--threads 1] [--rounds 7]

Writes ``bench/results/training_cost.json`` and ``.md``; ``bench/mome_vs_unet.py`` reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CHAIN = REPO / "bench" / "demo_chain.json"
RESULTS = REPO / "bench" / "results"
UNET_FEATURES = [20, 40, 80, 156]  # 2,144,654 parameters; the demo MoME with its classifier has 2,137,045
ADAMW = "$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)"

# kind -> (config, overrides, how one iteration runs). "step": one training step at curriculum weight r;
# "frozen": a gate warm-up step (experts frozen, r = 1); "classifier": one modality-classifier warm-up step.
KINDS = {
    "expert_48": ("train_expert.json", {"expert_modality": "t1"}, "step"),
    "expert_64": ("train_expert.json", {"expert_modality": "t1", "patch_size": [64, 64, 64]}, "step"),
    "joint_48": ("train.json", {"modality_classifier": False}, "step"),
    "gate_48": ("train.json", {"modality_classifier": False}, "frozen"),
    "gate_classifier_48": ("train.json", {"modality_classifier": True}, "frozen"),
    "classifier_48": ("train.json", {"modality_classifier": True}, "classifier"),
    "gate_classifier_64": ("train.json", {"modality_classifier": True, "patch_size": [64, 64, 64]}, "frozen"),
    "unet_48": ("train_expert.json", {"train_modalities": "$@modalities", "features_per_stage": UNET_FEATURES}, "step"),
    "unet_64": (
        "train_expert.json",
        {"train_modalities": "$@modalities", "features_per_stage": UNET_FEATURES, "patch_size": [64, 64, 64]},
        "step",
    ),
}


def load_chain(path: Path = CHAIN) -> dict:
    """The chain description: ``stages`` (name, kind, iterations, log) and what it leaves out."""
    chain = json.loads(path.read_text())
    for stage in chain["stages"]:
        if stage["kind"] not in KINDS:
            raise ValueError(f"{path}: stage {stage['name']!r} has unknown kind {stage['kind']!r}")
    return chain


def chain_iterations(chain: dict) -> dict[str, int]:
    """Iterations of the chain per kind."""
    totals: dict[str, int] = {}
    for stage in chain["stages"]:
        totals[stage["kind"]] = totals.get(stage["kind"], 0) + int(stage["iterations"])
    return totals


def equal_compute(chain: dict, seconds: dict[str, float], unet_kind: str) -> dict:
    """Chain cost in seconds (per kind and total) and the U-Net iterations that cost the same."""
    per_kind = {kind: n * seconds[kind] for kind, n in chain_iterations(chain).items()}
    total = sum(per_kind.values())
    return {
        "chain_seconds_per_kind": per_kind,
        "chain_seconds": total,
        "unet_kind": unet_kind,
        "unet_iterations": int(round(total / seconds[unet_kind])),
    }


def _trainer(config: str, overrides: dict, data: Path, out: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / config))
    settings = {"bundle_root": str(BUNDLE), "dataset_dir": str(data), "output_dir": str(out), "progress": False}
    settings.update({"optimizer": ADAMW, "init_experts": False, "val_fraction": 0.2, "resume": False})
    for key, value in {**settings, **overrides}.items():
        parser[key] = value
    return parser.get_parsed_content("train#trainer")


def _one_iteration(trainer, how: str, iteration: int) -> float:
    started = time.perf_counter()
    if how == "classifier":
        trainer.classifier_warmup_steps = 1
        trainer.warm_up_classifier()
    else:
        r = 0.5 if how == "step" else 1.0
        trainer.train_step(trainer.sampler.batch(iteration), r)
    return time.perf_counter() - started


def measure(data: Path, workdir: Path, rounds: int, kinds: list[str]) -> dict[str, list[float]]:
    """Seconds of one iteration of each kind, ``rounds`` interleaved rounds after one warm-up round."""
    trainers = {}
    for kind in kinds:
        config, overrides, how = KINDS[kind]
        trainer = _trainer(config, overrides, data, workdir / kind)
        trainer.network.train()
        if how != "step":
            trainer.network.experts.requires_grad_(False)
        trainers[kind] = trainer
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(rounds + 1):
        for kind in kinds:
            seconds = _one_iteration(trainers[kind], KINDS[kind][2], round_)
            if round_:
                times[kind].append(seconds)
        print(f"round {round_}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items() if v), flush=True)
    return times


def markdown(report: dict, chain: dict) -> str:
    seconds, cost = report["seconds_per_iteration"], report["equal_compute"]
    lines = [
        "# Training cost of the demo MoME chain and the equal-compute U-Net",
        "",
        f"Machine: {report['machine']}; {report['threads']} thread(s), {report['precision']}; medians of "
        f"{report['rounds']} interleaved rounds (bundle trainer: sampling, augmentation, step).",
        "",
        "| kind | s / iteration | chain iterations | chain seconds |",
        "|---|---|---|---|",
    ]
    iterations = chain_iterations(chain)
    for kind, value in seconds.items():
        n = iterations.get(kind, 0)
        lines.append(f"| {kind} | {value:.3f} | {n:,} | {n * value:,.0f} |")
    lines += [
        "",
        f"Chain total: {cost['chain_seconds']:,.0f} s ({cost['chain_seconds'] / 3600:.1f} h on one thread). "
        f"Equal-compute U-Net ({cost['unet_kind']}, features {UNET_FEATURES}): "
        f"**{cost['unet_iterations']:,} iterations**.",
        "",
        "Stages (from `bench/demo_chain.json`):",
        "",
        "| stage | kind | iterations |",
        "|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['kind']} | {s['iterations']:,} |" for s in chain["stages"]]
    lines += ["", "Not counted: " + chain["not_counted"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "cost")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the chain's lanes ran one each)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--unet-kind", default="unet_64", choices=["unet_48", "unet_64"])
    parser.add_argument("--cpu-bf16", action="store_true", help="bfloat16 autocast where native (default float32)")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_cost.json")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BUNDLE))
    chain = load_chain()
    data = args.workdir.resolve() / "data"
    if not (data / "dataset.json").is_file():  # a throwaway dataset: timing only, no held-out seed is touched
        cmd = [sys.executable, "-m", "scripts.synthetic", "--out", str(data), "--cases", "6", "--seed", "99", "--quiet"]
        subprocess.run(cmd, cwd=BUNDLE, env={**os.environ, "PYTHONPATH": str(BUNDLE)}, check=True)
    for kind in KINDS:
        KINDS[kind][1]["cpu_bf16"] = args.cpu_bf16
    times = measure(data, args.workdir.resolve(), args.rounds, list(KINDS))
    seconds = {kind: statistics.median(values) for kind, values in times.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "precision": "bfloat16 where native" if args.cpu_bf16 else "float32",
        "rounds": args.rounds,
        "unet_features": UNET_FEATURES,
        "seconds_per_iteration": seconds,
        "samples": times,
        "chain_iterations": chain_iterations(chain),
        "equal_compute": equal_compute(chain, seconds, args.unet_kind),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, chain)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
