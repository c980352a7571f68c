"""MoME+ benchmark: all 15 availability patterns of T1, T1ce, T2, FLAIR on held-out synthetic gliomas.

Three models are trained on the same synthetic multi-contrast glioma subjects (BraTS sub-region labels: 1 necrotic
core, 2 oedema, 3 enhancing) and compared on a held-out seed, for every non-empty subset of the four contrasts:

* ``mome_plus``: the demo MoME+ (``configs/train_plus.json``: dispatch MLP, 4 experts, prior-conditioned gate, modality
  dropout, curriculum applied), trained from scratch or, with ``--init-from-demo``, with its experts started from the
  shipped demo MoME's T1/T1ce/T2/FLAIR experts (fresh 4-class heads; ``--demo-model`` another MoME: the shipped
  ``model_plus.pt`` started from demo MoME 0.5.0, see ``bench/recipes/demo_weights.sh``);
* ``unet_zero_fill``: one plain U-Net on all four channels, trained with the same modality dropout, missing channels
  zero-filled (``modality_dropout``), of about the same parameter count;
* ``mome_best_single``: a single-modality MoME (4 experts + gate, ``configs/train.json`` with 4 classes) trained on the
  same subjects one contrast at a time (experts from the demo MoME too with ``--init-from-demo``), applied to the
  best available contrast of each pattern (best = highest Dice of that model on its own validation patches, so the
  test set does not choose).

Cost: every test case is segmented 34 times (15 patterns x 2 models + 4 contrasts, whole volumes, nnU-Net tiling at
step 0.5): about 6 min per case on 2 cores for the demo sizes. Metrics per case and pattern: Dice of the
BraTS regions whole tumour (labels 1-3), tumour core (1, 3) and enhancing tumour (3), and their mean. Each step is
skipped when its output exists, so an interrupted run continues; ``--parallel`` trains the three models side by side
with one thread each. Results: ``bench/results/momeplus_patterns.json`` and ``.md``; ``--export-demo`` copies the
MoME+ weights to ``bundle/models/model_plus.pt``.

Usage (repository root, inside the venv)::

    python bench/momeplus_patterns.py --workdir .train4 [--parallel] [--only mome_plus] [--export-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))  # the bundle's scripts: networks, training, evaluation

from scripts.networks import PLUS_MODALITIES as MODALITIES  # noqa: E402 - MoME+'s channel order

RESULTS = REPO / "bench" / "results"
MODELS = ("mome_plus", "unet_zero_fill", "mome_best_single")
REGIONS = {"whole_tumour": (1, 2, 3), "tumour_core": (1, 3), "enhancing": (3,)}
DEFAULTS = {
    "train_subjects": 80,
    "test_subjects": 12,
    "train_seed": 0,
    "test_seed": 1,
    "epochs": 30,
    "iterations": 25,
    "lr": 0.001,
    "foreground_fraction": 0.5,
    "unet_features": [20, 40, 80, 156],
    "seed": 0,
}
ADAMW = "$torch.optim.AdamW(@network.parameters(), lr=@learning_rate, weight_decay=3e-5)"


def _env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def generate(workdir: Path, seed: int, subjects: int) -> Path:
    out = workdir / f"plus_seed{seed}"
    if not (out / "dataset.json").is_file():
        cmd = [sys.executable, "-m", "scripts.synthetic", "--out", str(out), "--cases", str(subjects), "--seed"]
        cmd += [str(seed), "--multichannel", "--label-scheme", "brats", "--lesion-types", "glioma=1", "--quiet"]
        subprocess.run(cmd, cwd=BUNDLE, env=_env(None), check=True)
    return out


def single_contrast_view(data: Path) -> Path:
    """The multi-channel dataset as single-contrast cases (same files; ``modality`` per channel) for MoME."""
    view = data / "single_contrast.json"
    if not view.is_file():
        dataset = json.loads((data / "dataset.json").read_text())
        entries = []
        for entry in dataset["training"]:
            for modality, image in zip(entry["modalities"], entry["image"]):
                case = {"case": f"{entry['case']}_{modality}", "subject": entry["subject"], "modality": modality}
                entries.append({**case, "image": image, "label": entry["label"], "lesion_type": entry["lesion_type"]})
        view.write_text(json.dumps({**dataset, "channel_names": {"0": "MR"}, "training": entries}, indent=1))
    return view


def _train(config: str, overrides: dict, out: Path, threads: int | None) -> Path:
    if (out / "model_final.pt").is_file():
        return out
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}", "--bundle_root", "."]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as log:
        code = subprocess.run(args, cwd=BUNDLE, env=_env(threads), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"training {out.name} failed (exit {code}); see {out / 'train.log'}.")
    return out


def _topology() -> dict:
    """The network sizes of ``configs/train_plus.json`` (shared by the three models)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train_plus.json"))
    keys = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder")
    return {k: parser[k] for k in keys}


def demo_expert_checkpoints(workdir: Path, demo_model: Path = BUNDLE / "models" / "model.pt") -> list[str]:
    """``demo_model``'s (the shipped demo MoME's) T1, T1ce, T2, FLAIR experts as ``load_experts`` files, 4-class heads.

    The demo experts were trained on single-contrast synthetic lesions of all types (binary labels, training seed 0);
    their bodies carry over, their 1x1x1 heads are replaced by the (seeded) initialisation of a 4-class expert.
    """
    import torch

    from scripts.networks import MoMEPlus

    out = workdir / "demo_experts"
    paths = [out / f"{m}.pt" for m in MODALITIES]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    demo = torch.load(demo_model, map_location="cpu", weights_only=True)
    demo_order = json.loads((BUNDLE / "configs" / "inference.json").read_text())["modalities"]
    torch.manual_seed(0)
    fresh = MoMEPlus(4, 4, **_topology())
    out.mkdir(parents=True, exist_ok=True)
    for k, (modality, path) in enumerate(zip(MODALITIES, paths)):
        prefix = f"experts.{demo_order.index(modality)}."
        state = fresh.experts[k].state_dict()
        for key in state:
            if not key.startswith("heads."):
                state[key] = demo[prefix + key].clone()
        torch.save(state, path)
    return [str(p) for p in paths]


def _common(cfg: dict, out: Path, experts: list[str] | None = None) -> dict:
    common = {
        "seed": cfg["seed"], "progress": "False", "optimizer": ADAMW, "learning_rate": cfg["lr"],
        "foreground_fraction": cfg["foreground_fraction"], "epochs": cfg["epochs"],
        "iterations_per_epoch": cfg["iterations"], "output_dir": str(out), "init_experts": "False",
    }  # fmt: skip
    if experts:
        common.update({"init_experts": "True", "expert_checkpoints": experts})
    if "cpu_bf16" in cfg:
        common["cpu_bf16"] = str(cfg["cpu_bf16"])
    return common


def train_model(
    name: str, cfg: dict, workdir: Path, data: Path, threads: int | None, experts: list[str] | None = None
) -> Path:
    out = workdir / name
    common = {**_common(cfg, out, None if name == "unet_zero_fill" else experts), "dataset_dir": str(data)}
    if name == "mome_plus":
        return _train("train_plus.json", common, out, threads)
    if name == "unet_zero_fill":
        network = {
            "_target_": "scripts.training.build_unet", "in_channels": 4, "num_classes": "@num_classes",
            "features_per_stage": cfg["unet_features"], "kernel_sizes": "@kernel_sizes", "strides": "@strides",
            "n_conv_per_stage": "@n_conv_per_stage", "n_conv_per_stage_decoder": "@n_conv_per_stage_decoder",
        }  # fmt: skip
        return _train("train_plus.json", {**common, "network_def": network, "modality_dropout": "True"}, out, threads)
    overrides = {**common, "dataset_json": str(single_contrast_view(data)), "num_classes": 4}
    overrides["modalities"] = list(MODALITIES)
    return _train("train.json", overrides, out, threads)


def _networks(workdir: Path, cfg: dict):
    """The three trained networks (eval mode) and the single MoME's contrast ranking from its validation Dice."""
    import torch

    from scripts.networks import MoME, MoMEPlus
    from scripts.training import build_unet

    topology = _topology()
    nets = {
        "mome_plus": MoMEPlus(4, 4, **topology),
        "unet_zero_fill": build_unet(4, 4, **{**topology, "features_per_stage": cfg["unet_features"]}),
        "mome_best_single": MoME(4, 1, 4, **topology),
    }
    for name, net in nets.items():
        net.load_state_dict(torch.load(workdir / name / "model.pt", map_location="cpu", weights_only=True))
        net.eval()
    log = [json.loads(line) for line in (workdir / "mome_best_single" / "train_log.jsonl").read_text().splitlines()]
    best = max((r for r in log if r.get("best")), key=lambda r: r["epoch"], default=log[-1])
    ranking = sorted(MODALITIES, key=lambda m: -best["val_dice"].get(m, 0.0))
    return nets, ranking, topology


def region_dice(prediction, truth) -> dict[str, float]:
    import numpy as np

    out = {}
    for region, labels in REGIONS.items():
        p, t = np.isin(prediction, labels), np.isin(truth, labels)
        denominator = int(p.sum()) + int(t.sum())
        out[region] = 1.0 if denominator == 0 else 2.0 * float((p & t).sum()) / denominator
    out["mean"] = float(np.mean([out[r] for r in REGIONS]))
    return out


def evaluate(workdir: Path, cfg: dict, test: Path, wanted: list[str] | None = None) -> dict:
    """Dice of every model, case and availability pattern on the held-out set (whole volumes, fast profile)."""
    import numpy as np
    import torch
    from monai.transforms import LoadImage, NormalizeIntensity

    from scripts.plus import LoadModalitiesd, availability_patterns, pattern_name
    from scripts.profiles import ProfileInferer

    nets, ranking, _ = _networks(workdir, cfg)
    parser_patch = json.loads((BUNDLE / "configs" / "train_plus.json").read_text())["patch_size"]
    inferer = ProfileInferer(profile="fast", roi_size=parser_patch)
    normalize = NormalizeIntensity(nonzero=False, channel_wise=True)
    loader, label_loader = LoadModalitiesd("image", 4), LoadImage(image_only=True)
    cases = json.loads((test / "dataset.json").read_text())["training"][: cfg["test_subjects"]]
    rows = []
    for entry in cases:
        data = loader({"image": [str(test / f) for f in entry["image"]], "case": entry["case"]})
        full = normalize(data["image"].as_tensor())
        truth = np.asarray(label_loader(str(test / entry["label"])))
        single_cache: dict[str, object] = {}  # the single-modality MoME's output depends on the contrast only
        for pattern in availability_patterns(4):
            if wanted and pattern_name(pattern, MODALITIES) not in wanted:
                continue
            c = torch.tensor([pattern], dtype=torch.float32)
            x = (full * c[0, :, None, None, None])[None]
            best = next(m for m in ranking if pattern[MODALITIES.index(m)])
            with torch.inference_mode():
                if best not in single_cache:
                    single = full[MODALITIES.index(best)][None, None]
                    single_cache[best] = inferer(single, nets["mome_best_single"])
                logits = {
                    "mome_plus": inferer(x, nets["mome_plus"], availability=c),
                    "unet_zero_fill": inferer(x, nets["unet_zero_fill"]),
                    "mome_best_single": single_cache[best],
                }
            name = pattern_name(pattern, MODALITIES)
            for model, out in logits.items():
                dice = region_dice(out[0].argmax(0).numpy(), truth)
                rows.append({"case": entry["case"], "pattern": name, "model": model, **dice})
                if model == "mome_best_single":
                    rows[-1]["contrast"] = best
        print(f"evaluated {entry['case']}", flush=True)
    return {"rows": rows, "single_ranking": ranking}


def summarise(rows: list[dict]) -> dict:
    import numpy as np

    table: dict[str, dict[str, dict[str, float]]] = {}
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        table[pattern] = {}
        for model in MODELS:
            mine = [r for r in rows if r["pattern"] == pattern and r["model"] == model]
            table[pattern][model] = {k: float(np.mean([r[k] for r in mine])) for k in (*REGIONS, "mean")}
    overall = {m: float(np.mean([table[p][m]["mean"] for p in table])) for m in MODELS}
    return {"per_pattern": table, "mean_over_patterns": overall}


def markdown(report: dict) -> str:
    lines = [
        "# MoME+ vs baselines over the 15 availability patterns (synthetic gliomas, held-out seed)",
        "",
        f"Machine: {report['machine']}. Training: {report['training']}.",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
        f"Single-modality MoME contrast ranking (its validation Dice): {' > '.join(report['single_ranking'])}.",
        "",
        "Mean of the whole-tumour, tumour-core and enhancing-tumour Dice:",
        "",
        "| available | MoME+ | U-Net (zero-filled) | MoME on best single | MoME+ - U-Net | MoME+ - best single |",
        "|---|---|---|---|---|---|",
    ]
    for pattern, row in report["summary"]["per_pattern"].items():
        a, b, c = (row[m]["mean"] for m in MODELS)
        lines.append(f"| {pattern} | {a:.3f} | {b:.3f} | {c:.3f} | {a - b:+.3f} | {a - c:+.3f} |")
    a, b, c = (report["summary"]["mean_over_patterns"][m] for m in MODELS)
    lines.append(
        f"| **mean of patterns** | **{a:.3f}** | **{b:.3f}** | **{c:.3f}** | **{a - b:+.3f}** | **{a - c:+.3f}** |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".train4")
    parser.add_argument("--parallel", action="store_true", help="train the models side by side, one thread each")
    parser.add_argument("--only", nargs="+", choices=MODELS, help="train only these (no evaluation)")
    parser.add_argument("--export-demo", action="store_true", help="copy MoME+ weights to bundle/models/model_plus.pt")
    parser.add_argument("--patterns", nargs="+", help="evaluate only these patterns, e.g. t1ce+flair (default: all 15)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and Markdown go")
    parser.add_argument(
        "--init-from-demo",
        action="store_true",
        help="start the experts of both MoME models from the shipped demo MoME's experts (heads re-initialised)",
    )
    parser.add_argument(
        "--demo-model", type=Path, default=BUNDLE / "models" / "model.pt", help="with --init-from-demo: the demo MoME"
    )
    parser.add_argument(
        "--cpu-bf16", choices=("true", "false"), help="the train configs' cpu_bf16 (default: the configs' own, true)"
    )
    parser.add_argument("--note", default="", help="a remark recorded with the results (e.g. how the run went)")
    for key, value in DEFAULTS.items():
        many = isinstance(value, list)
        kind = int if many else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=value, nargs="+" if many else None)
    args = parser.parse_args(argv)
    cfg = {key: getattr(args, key) for key in DEFAULTS}
    if args.cpu_bf16:
        cfg["cpu_bf16"] = args.cpu_bf16 == "true"
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    train = generate(workdir, cfg["train_seed"], cfg["train_subjects"])
    test = generate(workdir, cfg["test_seed"], cfg["test_subjects"])
    threads = 1 if args.parallel else None
    started = time.time()
    models = args.only or MODELS
    experts = demo_expert_checkpoints(workdir, args.demo_model.resolve()) if args.init_from_demo else None
    workers = [threading.Thread(target=train_model, args=(m, cfg, workdir, train, threads, experts)) for m in models]
    for worker in workers:
        worker.start()
        if not args.parallel:
            worker.join()
    for worker in workers:
        worker.join()
    if args.only:
        return 0
    evaluation = evaluate(workdir, cfg, test, args.patterns)
    seconds = {m: _train_seconds(workdir / m) for m in MODELS}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "training": f"{cfg['epochs']} epochs x {cfg['iterations']} iterations each, AdamW lr {cfg['lr']}, "
        f"train seconds {seconds}, wall {time.time() - started:.0f} s"
        + (", MoME experts started from the demo MoME's" if args.init_from_demo else ", all from scratch"),
        "config": cfg,
        "note": args.note,
        "experts_from_demo": args.init_from_demo,
        "single_ranking": evaluation["single_ranking"],
        "summary": summarise(evaluation["rows"]),
        "per_case": evaluation["rows"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "momeplus_patterns.json").write_text(json.dumps(report, indent=1))
    (args.results / "momeplus_patterns.md").write_text(markdown(report))
    print(markdown(report))
    if args.export_demo:
        shutil.copy2(workdir / "mome_plus" / "model.pt", BUNDLE / "models" / "model_plus.pt")
    return 0


def _train_seconds(model_dir: Path) -> float:
    log = model_dir / "train_log.jsonl"
    return round(sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip()), 1)


if __name__ == "__main__":
    sys.exit(main())
