"""Where a model's errors fall on synthetic data: false positives by tissue, near the lesion or far from it.

The synthetic generator draws each subject from ``default_rng([seed, index])`` alone, so the tissue maps behind every
case of a MoME-space dataset can be rebuilt (``scripts.synthetic.regenerate_subject``); the rebuilt label must equal
the stored one, which checks that the rebuild is the subject that was written. Each false-positive voxel is then put
in one class:

- ``border``: within ``--border`` voxels (Chebyshev distance, default 2) of the true lesion, a contour disagreement;
- ``csf``, ``gm``, ``wm``: farther away, by the voxel's largest tissue fraction, a spurious detection in that tissue;
- ``outside``: outside the subject's brain mask.

Reported per case and as the mean per modality, in millilitres per case, with the missed (false-negative) and found
(true-positive) lesion volume. ``bench/mome_vs_unet.py`` uses it to explain the per-modality Dice of both models.

Usage (repository root, inside the venv; predictions as ``mome-eval --out R.json`` keeps them in ``R_predictions/``)::

    python bench/errors_by_tissue.py --data .bench/data_seed1 --predictions .bench/eval_mome_data_seed1_predictions
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO))

from app.evaluation import check_same_grid, prediction_path  # noqa: E402
from scripts.metrics import voxel_ml  # noqa: E402
from scripts.synthetic import Subject, regenerate_subject  # noqa: E402

CLASSES = ("border", "csf", "gm", "wm", "outside")


def error_classes(subject: Subject, truth: np.ndarray, border: int = 2) -> np.ndarray:
    """Class index (into ``CLASSES``) of every voxel, for classifying false positives."""
    classes = 1 + np.argmax(subject.tissues, axis=0)
    classes[subject.brain <= 0] = CLASSES.index("outside")
    lesion = torch.from_numpy(np.asarray(truth > 0, dtype=np.float32))[None, None]
    near = F.max_pool3d(lesion, 2 * border + 1, stride=1, padding=border)[0, 0].numpy() > 0
    classes[near] = CLASSES.index("border")
    return classes


def case_errors(prediction: np.ndarray, truth: np.ndarray, classes: np.ndarray, voxel_ml: float) -> dict:
    """Found, missed and false-positive lesion volume (mL) of one case, the latter per class."""
    predicted, lesion = prediction > 0, truth > 0
    false_positive = np.bincount(classes[predicted & ~lesion], minlength=len(CLASSES)) * voxel_ml
    return {
        "tp_ml": float((predicted & lesion).sum() * voxel_ml),
        "fn_ml": float((~predicted & lesion).sum() * voxel_ml),
        "fp_ml": {name: float(value) for name, value in zip(CLASSES, false_positive)},
    }


def analyse(data_dir: Path, predictions: Path, border: int = 2, cases: list[str] | None = None) -> dict:
    """Errors by class for the cases (default: all) of a MoME-space synthetic dataset, predicted in ``predictions``."""
    dataset = json.loads((data_dir / "dataset.json").read_text())
    generator = dataset.get("generator", {})
    if generator.get("label_scheme", "binary") != "binary" or generator.get("layout") == "multichannel":
        raise ValueError(f"{data_dir}: only single-contrast datasets with binary labels are supported.")
    subjects: dict[str, Subject] = {}
    per_case = []
    entries = [e for e in dataset["training"] if cases is None or e["case"] in cases]
    missing = set(cases or ()) - {e["case"] for e in entries}
    if missing:
        raise ValueError(f"{data_dir}: no case {', '.join(sorted(missing))} in dataset.json.")
    for entry in entries:
        name = entry["subject"]
        if name not in subjects:
            subjects[name] = regenerate_subject(generator, name)
        label = nib.load(data_dir / entry["label"])
        truth = np.asanyarray(label.dataobj)
        if not np.array_equal(truth > 0, subjects[name].label > 0):
            raise ValueError(f"{data_dir / entry['label']}: the rebuilt subject's label differs from the stored one.")
        path = prediction_path(predictions, data_dir / entry["image"])
        if not path.is_file():
            raise ValueError(f"{path}: prediction of case {entry['case']} not found.")
        check_same_grid(path, data_dir / entry["label"])
        predicted = nib.load(path)
        classes = error_classes(subjects[name], truth, border)
        errors = case_errors(np.asanyarray(predicted.dataobj), truth, classes, voxel_ml(label.affine))
        per_case.append({"case": entry["case"], "modality": entry["modality"], **errors})
    return {"border_voxels": border, "per_case": per_case, "per_modality": per_modality(per_case)}


def per_modality(per_case: list[dict]) -> dict[str, dict]:
    """Mean volumes (mL per case) per modality."""
    grouped: dict[str, list[dict]] = {}
    for case in per_case:
        grouped.setdefault(case["modality"], []).append(case)
    summary = {}
    for modality, cases in grouped.items():
        summary[modality] = {
            "n": len(cases),
            "tp_ml": float(np.mean([c["tp_ml"] for c in cases])),
            "fn_ml": float(np.mean([c["fn_ml"] for c in cases])),
            "fp_ml": {k: float(np.mean([c["fp_ml"][k] for c in cases])) for k in CLASSES},
        }
    return summary


def table_rows(summary: dict[str, dict], label: str = "") -> list[str]:
    """Markdown rows ``| label | modality | n | found | missed | FP border | csf | gm | wm | outside |``."""
    rows = []
    for modality, row in summary.items():
        fp = " | ".join(f"{row['fp_ml'][k]:.2f}" for k in CLASSES)
        rows.append(f"| {label} | {modality} | {row['n']} | {row['tp_ml']:.2f} | {row['fn_ml']:.2f} | {fp} |")
    return rows


TABLE_HEADER = [
    "| model | modality | n | found mL | missed mL | FP mL: lesion border | CSF | GM | WM | outside brain |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MoME-space synthetic dataset (scripts.synthetic)")
    parser.add_argument("--predictions", type=Path, required=True, help="folder of <image stem>_seg.nii.gz")
    parser.add_argument("--border", type=int, default=2, help="voxels around the lesion counted as its border")
    parser.add_argument("--cases", nargs="+", metavar="CASE_ID", help="analyse only these cases")
    parser.add_argument("--out", type=Path, help="write the per-case and per-modality results here (JSON)")
    args = parser.parse_args(argv)
    result = analyse(args.data, args.predictions, args.border, args.cases)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join([*TABLE_HEADER, *table_rows(result["per_modality"], args.predictions.name)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
