"""Quality guard of the inference profiles: ``fast`` (and ``accurate``) against ``parity`` on labelled cases.

For the first ``--per-modality`` cases of each modality of a labelled MoME-space dataset (e.g. held-out synthetic
seed 1), every profile - and every ``--variant NAME TILE_STEP TILE_SCALE`` (the ``fast`` profile with other tiles,
to evaluate the tiling levers; SCALE ``inf`` = one whole-volume tile) - segments the case with the bundle's network
and weights; reported per case: network seconds, Dice of the labels to ``parity``'s (agreement) and to the ground
truth. Issue 6's bar: agreement >= 0.98 and |Dice(x) - Dice(parity)| <= 0.01 per case.

Usage (from the repository root)::

    PYTHONPATH=bundle python bench/profile_agreement.py --data DATA_DIR --model bundle \\
        --out bench/results/profile_agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.metrics import dice
from scripts.profiles import ProfileInferer, cpu_has_native_bf16

PROFILE_ORDER = ("parity", "fast", "accurate")


def load_bundle(bundle: Path) -> tuple[ConfigParser, torch.nn.Module]:
    """The bundle's parsed inference config and its network with weights, in eval mode on the CPU."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    return parser, network.eval()


def pick_cases(data: Path, per_modality: int) -> list[dict[str, Any]]:
    """The first ``per_modality`` cases of each modality listed in the dataset JSON."""
    entries = json.loads((data / "dataset.json").read_text())["training"]
    chosen: dict[str, list] = defaultdict(list)
    for entry in entries:
        if len(chosen[entry["modality"]]) < per_modality:
            chosen[entry["modality"]].append(entry)
    return [entry for group in chosen.values() for entry in group]


def make_inferer(parser: ConfigParser, name: str, variants: dict[str, dict[str, Any]]) -> ProfileInferer:
    """The profile ``name``, or the ``fast`` profile with a variant's overrides (tile step and scale, bf16)."""
    profile = name if name in PROFILE_ORDER else "fast"
    overrides = variants.get(name, {})
    roi, axes = parser.get("patch_size"), parser.get("mirror_axes")
    return ProfileInferer(profile, roi_size=roi, mirror_axes=axes, **overrides)


def segment(network: torch.nn.Module, image: torch.Tensor, inferer: ProfileInferer) -> tuple[np.ndarray, float]:
    """Labels (bundle axis order) and network seconds of one preprocessed image ``(C, D, H, W)``."""
    started = time.perf_counter()
    with torch.inference_mode():
        logits = inferer(image[None], network)[0]
    seconds = time.perf_counter() - started
    return logits.argmax(0).numpy().astype(np.uint8), seconds


def truth(data: Path, entry: dict[str, Any], preprocessing: Any) -> np.ndarray:
    """Ground-truth label in the same axis order as :func:`segment`'s output (the loading steps only)."""
    label = {"image": str(data / entry["label"])}
    loader = preprocessing.transforms[:3]
    for transform in loader:
        label = transform(label)
    return np.asarray(label["image"][0]).astype(np.uint8)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    parser, network = load_bundle(args.model)
    preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    variants: dict[str, dict[str, Any]] = {
        name: {"tile_step": float(step), "tile_scale": float(scale)} for name, step, scale in args.variant or []
    }
    if args.bf16_variant and not cpu_has_native_bf16():
        raise SystemExit(
            "--bf16-variant: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16); nothing to measure."
        )
    variants.update({name: {"cpu_bf16": True} for name in args.bf16_variant or []})
    names = [*args.profiles, *variants]
    inferers = {name: make_inferer(parser, name, variants) for name in names}
    cases = []
    for entry in pick_cases(args.data, args.per_modality):
        image = preprocessing({"image": str(args.data / entry["image"])})["image"]
        gt = truth(args.data, entry, preprocessing)
        labels, row = {}, {"case": entry["case"], "modality": entry["modality"], "seconds": {}, "dice_to_truth": {}}
        row["tiles"] = {}
        for name in names:
            labels[name], row["seconds"][name] = segment(network, image, inferers[name])
            row["dice_to_truth"][name] = dice(labels[name], gt)
            described = inferers[name].describe()
            row["tiles"][name] = described["n_tiles"]
            row.setdefault("precision", {})[name] = described["precision"]
        row["agreement_with_parity"] = {n: dice(labels[n], labels["parity"]) for n in names if n != "parity"}
        cases.append(row)
        print(json.dumps(row), flush=True)
    settings = {name: {k: v for k, v in inferers[name].describe().items() if k in ("tile_step", "tile_scale", "tta",
                "accumulate_dtype", "precision")} for name in names}  # fmt: skip
    return {"model": str(args.model), "data": str(args.data), "threads": torch.get_num_threads(),
            "settings": settings, "cases": cases, "summary": summarise(cases, names)}  # fmt: skip


def summarise(cases: list[dict[str, Any]], profiles: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for profile in profiles:
        seconds = [c["seconds"][profile] for c in cases]
        entry = {"median_network_seconds": statistics.median(seconds),
                 "mean_dice_to_truth": statistics.fmean(c["dice_to_truth"][profile] for c in cases)}  # fmt: skip
        if profile != "parity":
            agreement = [c["agreement_with_parity"][profile] for c in cases]
            gaps = [abs(c["dice_to_truth"][profile] - c["dice_to_truth"]["parity"]) for c in cases]
            entry.update(min_agreement=min(agreement), median_agreement=statistics.median(agreement),
                         max_dice_gap=max(gaps), speedup=statistics.median(
                             c["seconds"]["parity"] / c["seconds"][profile] for c in cases))  # fmt: skip
        summary[profile] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labelled MoME-space dataset (dataset.json)")
    parser.add_argument("--model", type=Path, default=Path("bundle"), help="bundle folder")
    parser.add_argument("--per-modality", type=int, default=2, help="cases per modality")
    parser.add_argument("--profiles", nargs="+", default=["parity", "fast"], choices=PROFILE_ORDER)
    parser.add_argument("--variant", nargs=3, action="append", metavar=("NAME", "TILE_STEP", "TILE_SCALE"),
                        help="the fast profile with other tiles (repeatable)")  # fmt: skip
    parser.add_argument("--bf16-variant", action="append", metavar="NAME",
                        help="the fast profile with bfloat16 autocast (native-bf16 CPUs; repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    if args.profiles[0] != "parity":
        args.profiles = ["parity", *[p for p in args.profiles if p != "parity"]]
    results = run(args)
    print(json.dumps(results["summary"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _cell(entry: dict[str, Any], key: str, digits: int = 3) -> str:
    return f"{entry[key]:.{digits}f}" if key in entry else "-"


def markdown(results: dict[str, Any]) -> str:
    """Summary table: per profile/variant, tiles, speed-up over parity, agreement and Dice gap."""
    cases = results["cases"]
    lines = [
        "# Inference profiles vs parity on labelled cases (`bench/profile_agreement.py`)",
        "",
        f"Model: `{results['model']}`; data: `{results['data']}`; {len(cases)} cases "
        f"({', '.join(sorted({c['modality'] for c in cases}))}); {results['threads']} threads.",
        "Bar (issue 6): agreement with parity >= 0.98 and |Dice - Dice(parity)| <= 0.01 on every case.",
        "",
        "| profile / variant | tile step | tile scale | precision | tiles (first case) | median network s | speed-up | "
        "mean Dice to truth | min agreement | median agreement | max Dice gap | passes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["summary"].items():
        setting = results["settings"][name]
        passes = "-" if name == "parity" else ("yes" if entry["min_agreement"] >= 0.98 and entry["max_dice_gap"]
                                                <= 0.01 else "no")  # fmt: skip
        lines.append(
            f"| {name} | {setting['tile_step']} | {setting['tile_scale']} | {setting.get('precision', '-')} | "
            f"{cases[0]['tiles'][name]} | "
            f"{_cell(entry, 'median_network_seconds', 1)} | {_cell(entry, 'speedup', 2)} | "
            f"{_cell(entry, 'mean_dice_to_truth')} | {_cell(entry, 'min_agreement')} | "
            f"{_cell(entry, 'median_agreement')} | {_cell(entry, 'max_dice_gap')} | {passes} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
