"""``mome-eval``: evaluate a MoME bundle on any labelled NIfTI dataset.

Usage::

    mome-eval --data DIR --model BUNDLE_DIR [--out results.json] [--predictions PRED_DIR]
              [--device cpu|cuda] [--cases CASE_ID ...]
    python -m app.cli_eval ...

Cases come from ``DIR/dataset.json`` (its ``"training"`` list, paths relative to ``DIR``) or, without one, from
``DIR/imagesTr/<case>_0000.nii.gz`` + ``DIR/labelsTr/<case>.nii.gz`` (``imagesTs``/``labelsTs`` if there is no
``imagesTr``), the modality then being the case id's suffix ``_t1|_t1ce|_t2|_flair|_dwi``. Unless ``--predictions``
is given, the bundle's own ``configs/inference.json`` segments the images; predictions are kept in
``<out stem>_predictions/`` next to ``--out``. Metrics are those of the bundle's ``scripts.metrics``.

MoME+ datasets (``dataset.json`` entries whose ``image`` lists one file per channel, as written by
``scripts.synthetic --multichannel``) are evaluated with the bundle's MoME+ model (``configs/inference_plus.json``)
once per availability pattern (``--patterns``: ``all`` = the 15 non-empty subsets of T1, T1ce, T2, FLAIR (default),
or names like ``t1ce+flair``); results are grouped per pattern and, for BraTS labels, include the Dice of the whole
tumour, tumour core and enhancing tumour. A pattern needing a channel a case lacks skips that case.

Exit codes: 0 ok, 1 internal error, 2 usage error, 3 input rejected (no cases, a missing label or prediction, a
prediction not on its label's grid; no results file is written).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from app.cli_seg import PROFILE_HELP, PROFILE_NAMES

__all__ = [
    "Case",
    "InputRejected",
    "build_parser",
    "discover_cases",
    "modality_of",
    "parse_args",
    "prediction_path",
    "run",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
MODALITY_RE = re.compile(r"_(t1|t1ce|t2|flair|dwi)$", re.IGNORECASE)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-3
logger = logging.getLogger("mome-eval")


class InputRejected(Exception):
    """The dataset, a label or a prediction cannot be evaluated; the message names the file and the reason."""


@dataclass(frozen=True)
class Case:
    """One labelled image of the dataset."""

    case: str
    modality: str
    image: Path
    label: Path
    lesion_type: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The ``mome-eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mome-eval",
        description="Evaluate a MoME bundle on a labelled NIfTI dataset (Dice, volume error, lesion-wise F1).",
    )
    parser.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="dataset folder (dataset.json or imagesTr/labelsTr)"
    )
    parser.add_argument(
        "--model", required=True, type=Path, metavar="BUNDLE_DIR", help="MoME bundle folder (e.g. made by mome-convert)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="RESULTS_JSON",
        help="results JSON to write; predictions go to <out stem>_predictions/",
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        metavar="PRED_DIR",
        help="skip inference and read <PRED_DIR>/<image stem>_seg.nii.gz instead",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="inference device (default: cuda if available)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, help=PROFILE_HELP)
    parser.add_argument("--cases", nargs="+", metavar="CASE_ID", help="evaluate only these cases")
    parser.add_argument(
        "--patterns",
        nargs="+",
        metavar="PATTERN",
        default=["all"],
        help="MoME+ datasets: availability patterns to evaluate, 'all' (default) or names like t1ce+flair",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses and checks the arguments; argparse exits with code 2 on usage errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder.")
    needed = ("configs/inference.json", "scripts/__init__.py", "scripts/metrics.py")
    missing = [name for name in needed if not (args.model / name).is_file()]
    if missing:
        parser.error(f"--model {args.model}: not a usable MoME bundle (no {', '.join(missing)}; re-run mome-convert).")
    if args.predictions is not None and not args.predictions.is_dir():
        parser.error(f"--predictions {args.predictions}: no such folder.")
    return args


def modality_of(case_id: str) -> str:
    """The modality encoded as the case id's suffix (``..._flair`` -> ``flair``), else ``unknown``."""
    match = MODALITY_RE.search(case_id)
    return match.group(1).lower() if match else "unknown"


def nifti_stem(path: Path) -> str:
    """File name without its NIfTI extension (``case_0000.nii.gz`` -> ``case_0000``)."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def prediction_path(pred_dir: Path, image: Path) -> Path:
    """Where the bundle's ``SaveImaged`` (postfix ``seg``) writes the prediction of ``image``."""
    return pred_dir / f"{nifti_stem(image)}_seg.nii.gz"


def _cases_from_datalist(data_dir: Path, dataset_json: Path) -> list[Case]:
    from monai.data import load_decathlon_datalist

    cases = []
    for item in load_decathlon_datalist(dataset_json, data_list_key="training", base_dir=data_dir):
        if not isinstance(item.get("image"), str) or not isinstance(item.get("label"), str):
            raise InputRejected(f"{dataset_json}: every training entry needs one 'image' and one 'label' path.")
        image, label = Path(item["image"]), Path(item["label"])
        case_id = str(item.get("case") or nifti_stem(label))
        modality = str(item.get("modality") or modality_of(case_id)).lower()
        cases.append(Case(case_id, modality, image, label, item.get("lesion_type")))
    return cases


def _cases_from_folders(data_dir: Path) -> list[Case]:
    split = "Tr" if (data_dir / "imagesTr").is_dir() else "Ts"
    images_dir, labels_dir = data_dir / f"images{split}", data_dir / f"labels{split}"
    cases = []
    for image in sorted(images_dir.glob("*_0000.nii*")):
        case_id = nifti_stem(image)[: -len("_0000")]
        cases.append(Case(case_id, modality_of(case_id), image, labels_dir / f"{case_id}.nii.gz"))
    return cases


def _has_training_list(dataset_json: Path) -> bool:
    try:
        content = json.loads(dataset_json.read_text())
    except (OSError, ValueError) as err:
        raise InputRejected(f"{dataset_json}: not readable JSON ({err}).") from err
    return isinstance(content, dict) and isinstance(content.get("training"), list)


def discover_cases(data_dir: Path) -> list[Case]:
    """The dataset's cases, from ``dataset.json`` if it has a ``training`` list, else from the nnU-Net folders."""
    dataset_json = data_dir / "dataset.json"
    if dataset_json.is_file() and _has_training_list(dataset_json):
        return _cases_from_datalist(data_dir, dataset_json)
    return _cases_from_folders(data_dir)


def select_cases(cases: list[Case], wanted: Sequence[str] | None, data_dir: Path) -> list[Case]:
    """Keeps the ``--cases`` (all when ``None``); rejects an empty dataset, unknown ids and missing files."""
    if not cases:
        raise InputRejected(f"{data_dir}: no cases found (no dataset.json training list, no imagesTr/imagesTs).")
    if wanted:
        unknown = sorted(set(wanted) - {c.case for c in cases})
        if unknown:
            raise InputRejected(f"{data_dir}: no such case(s): {', '.join(unknown)}.")
        cases = [c for c in cases if c.case in set(wanted)]
    stems = [nifti_stem(c.image) for c in cases]
    for case in cases:
        for kind, path in (("image", case.image), ("label", case.label)):
            if not path.is_file():
                raise InputRejected(f"{path}: {kind} of case {case.case} not found.")
        if stems.count(nifti_stem(case.image)) > 1:
            raise InputRejected(f"{case.image}: another image has the same file name; predictions would collide.")
    return cases


def check_same_grid(path: Path, reference: Path) -> None:
    """Rejects ``path`` unless its shape and affine equal those of ``reference`` (affine atol 1e-3)."""
    image, ref = nib.load(path), nib.load(reference)
    if image.shape != ref.shape:
        raise InputRejected(f"{path}: shape {image.shape} differs from {reference.name} {ref.shape}.")
    if not np.allclose(image.affine, ref.affine, atol=AFFINE_ATOL):
        raise InputRejected(f"{path}: affine differs from that of {reference.name} (not on the same voxel grid).")


def _device_override(device: str | None) -> dict[str, str]:
    if device is None:
        return {}
    return {"device": "$torch.device('cuda:0')" if device == "cuda" else "$torch.device('cpu')"}


def run_inference(
    bundle: Path, cases: Sequence[Case], data_dir: Path, out_dir: Path, device: str | None, profile: str | None = None
) -> None:
    """Runs the bundle's ``configs/inference.json`` on the cases' images, writing ``<stem>_seg.nii.gz`` to out_dir."""
    datalist = [{"image": str(case.image)} for case in cases]
    _run_workflow(bundle, "inference.json", datalist, out_dir, device, profile, dataset_dir=str(data_dir))


def _run_workflow(
    bundle: Path, config: str, datalist: list[dict[str, Any]], out_dir: Path, device: str | None,
    profile: str | None, **overrides: Any,
) -> None:  # fmt: skip
    """Runs ``configs/<config>`` of the bundle on ``datalist``, writing its predictions to ``out_dir``."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / config),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(bundle),
        output_dir=str(out_dir),
        datalist=datalist,
        **overrides,
        **_device_override(device),
        **({"profile": profile} if profile else {}),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def evaluate_case(case: Case, prediction: Path, data_dir: Path) -> dict[str, Any]:
    """Metrics of one case; rejects a missing prediction or one that is not on the label's grid."""
    from scripts.metrics import lesion_metrics

    if not prediction.is_file():
        raise InputRejected(f"{prediction}: prediction of case {case.case} not found.")
    check_same_grid(prediction, case.label)
    label = nib.load(case.label)
    voxel_volume_ml = float(np.prod(label.header.get_zooms()[:3])) / 1000.0
    truth = np.asanyarray(label.dataobj)
    predicted = np.asanyarray(nib.load(prediction).dataobj)
    record: dict[str, Any] = {"case": case.case, "modality": case.modality}
    if case.lesion_type is not None:
        record["lesion_type"] = case.lesion_type
    record["image"] = _relative(case.image, data_dir)
    record["label"] = _relative(case.label, data_dir)
    return {**record, **lesion_metrics(predicted, truth, voxel_volume_ml)}


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def model_info(bundle: Path) -> dict[str, Any]:
    """``name`` and ``version`` from the bundle's ``configs/metadata.json`` (``None`` where absent)."""
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        meta = {}
    return {"name": meta.get("name"), "version": meta.get("version"), "path": str(bundle.resolve())}


def _bundle_profile(bundle: Path) -> str | None:
    """The bundle's default inference profile (``configs/inference.json`` id ``profile``)."""
    try:
        return json.loads((bundle / "configs" / "inference.json").read_text()).get("profile")
    except (OSError, ValueError):
        return None


def build_results(
    bundle: Path, data_dir: Path, per_case: list[dict[str, Any]], profile: str | None = None
) -> dict[str, Any]:
    """The results document: model (with the inference profile; None for given predictions), data, per-case metrics,
    per-modality and overall means."""
    from scripts.metrics import summarise

    by_modality = summarise(per_case, key="modality")
    results: dict[str, Any] = {
        "model": {**model_info(bundle), "profile": profile},
        "data": str(data_dir.resolve()),
        "per_case": per_case,
        "per_modality": by_modality["groups"],
        "overall": by_modality["overall"],
    }
    if any("lesion_type" in case for case in per_case):
        results["per_lesion_type"] = summarise(per_case, key="lesion_type")["groups"]
    return results


def format_table(results: dict[str, Any]) -> str:
    """A readable summary: one line per modality (MoME+: per pattern), the overall mean and the mean of the group
    means; MoME+ results on BraTS labels add the mean Dice of the three BraTS regions."""
    groups = results.get("per_modality") or results["per_pattern"]
    kind = "modality" if "per_modality" in results else "pattern"
    width = max([10, *(len(name) for name in groups)])
    regions = all("dice_regions" in row for row in groups.values())
    header = f"{kind:<{width}} {'n':>4} {'Dice':>7} {'|vol err| mL':>13} {'lesion F1':>10}"
    header += f" {'BraTS regions':>14}" if regions else ""

    def line(name: str, n: int, row: dict[str, float]) -> str:
        text = (
            f"{name:<{width}} {n:>4} {row['dice']:>7.4f} {row['abs_volume_error_ml']:>13.3f} {row['lesion_f1']:>10.4f}"
        )
        return text + (f" {row['dice_regions']:>14.4f}" if regions and "dice_regions" in row else "")

    rows = [header, "-" * len(header)]
    rows += [line(name, row["n"], row) for name, row in groups.items()]
    overall = results["overall"]
    rows += ["-" * len(header), line("overall", overall["n"], overall)]
    macro = overall["mean_of_group_means"]
    rows.append(line("group mean", macro["n_groups"], macro) + f"  (mean of the per-{kind} means)")
    return "\n".join(rows)


def _predictions_dir(args: argparse.Namespace, scratch: Path) -> Path:
    if args.predictions is not None:
        return args.predictions
    if args.out is not None:
        kept = args.out.parent / f"{nifti_stem(args.out)}_predictions"
        kept.mkdir(parents=True, exist_ok=True)
        return kept
    return scratch


def _evaluate(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    if is_multichannel(args.data):
        return _evaluate_plus(args, scratch)
    cases = select_cases(discover_cases(args.data), args.cases, args.data)
    pred_dir = _predictions_dir(args, scratch)
    if args.predictions is None:
        for case in cases:
            check_same_grid(case.label, case.image)
        run_inference(args.model, cases, args.data, pred_dir, args.device, args.profile)
    per_case = [evaluate_case(case, prediction_path(pred_dir, case.image), args.data) for case in cases]
    profile = None if args.predictions else (args.profile or _bundle_profile(args.model))
    results = build_results(args.model, args.data, per_case, profile)
    if pred_dir != scratch:
        results["predictions"] = str(pred_dir.resolve())
    return results


def is_multichannel(data_dir: Path) -> bool:
    """Whether ``dataset.json`` lists MoME+ cases (one image file per channel)."""
    dataset_json = data_dir / "dataset.json"
    if not (dataset_json.is_file() and _has_training_list(dataset_json)):
        return False
    entries = json.loads(dataset_json.read_text())["training"]
    return bool(entries) and isinstance(entries[0].get("image"), list)


def _plus_modalities(bundle: Path) -> list[str]:
    from app.bundle_path import installed_models

    if not installed_models(bundle)["plus"]:
        raise InputRejected(
            f"{bundle}: the dataset is multi-channel (MoME+), but the bundle has no MoME+ model "
            "(configs/inference_plus.json with models/model_plus.pt)."
        )
    return [str(m) for m in json.loads((bundle / "configs" / "inference_plus.json").read_text())["modalities"]]


def plus_patterns(wanted: Sequence[str], modalities: Sequence[str]) -> list[tuple[int, ...]]:
    """Availability vectors for ``--patterns`` (``all`` or ``+``-joined modality names)."""
    from scripts.plus import availability_patterns, pattern_name

    every = availability_patterns(len(modalities))
    if list(wanted) == ["all"]:
        return every
    by_name = {pattern_name(p, modalities): p for p in every}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise InputRejected(f"--patterns {unknown}: not subsets of {'+'.join(modalities)} written in that order.")
    return [by_name[w] for w in wanted]


def _plus_items(args: argparse.Namespace, modalities: Sequence[str]) -> list[dict[str, Any]]:
    """One inference item per case and pattern, with the pattern's channels (``None`` = withheld)."""
    from monai.data import load_decathlon_datalist

    from scripts.plus import pattern_name

    dataset_json = args.data / "dataset.json"
    entries = load_decathlon_datalist(dataset_json, data_list_key="training", base_dir=args.data)
    names = [str(e.get("case") or nifti_stem(Path(e["label"]))) for e in entries]
    unknown = sorted(set(args.cases or []) - set(names))
    if unknown:
        raise InputRejected(f"{args.data}: no such case(s): {', '.join(unknown)}.")
    items = []
    for name, entry in zip(names, entries):
        if args.cases and name not in args.cases:
            continue
        files = [Path(f) if f else None for f in entry["image"]]
        if len(files) != len(modalities):
            raise InputRejected(
                f"{dataset_json}: case {name} has {len(files)} channel files, the model {len(modalities)}."
            )
        for path in [f for f in files if f is not None] + [Path(entry["label"])]:
            if not path.is_file():
                raise InputRejected(f"{path}: file of case {name} not found.")
        for pattern in plus_patterns(args.patterns, modalities):
            if any(flag and files[k] is None for k, flag in enumerate(pattern)):
                continue
            channels = [str(files[k]) if flag else None for k, flag in enumerate(pattern)]
            key = f"{name}__{pattern_name(pattern, modalities)}"
            items.append({"image": channels, "case": key, "label": Path(entry["label"]), "name": name,
                          "pattern": pattern_name(pattern, modalities)})  # fmt: skip
    if not items:
        raise InputRejected(f"{args.data}: no case has the channels of the requested patterns.")
    return items


def run_plus_inference(
    bundle: Path, items: Sequence[dict[str, Any]], out_dir: Path, device: str | None, profile: str | None = None
) -> None:
    """Runs the bundle's ``configs/inference_plus.json``; writes ``<case>__<pattern>_seg.nii.gz`` to ``out_dir``."""
    datalist = [{"image": item["image"], "case": item["case"]} for item in items]
    _run_workflow(bundle, "inference_plus.json", datalist, out_dir, device, profile)


def _evaluate_plus(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from scripts.metrics import brats_region_dice, lesion_metrics, summarise

    modalities = _plus_modalities(args.model)
    items = _plus_items(args, modalities)
    pred_dir = _predictions_dir(args, scratch)
    if args.predictions is None:
        run_plus_inference(args.model, items, pred_dir, args.device, args.profile)
    per_case = []
    for item in items:
        prediction = pred_dir / f"{item['case']}_seg.nii.gz"
        if not prediction.is_file():
            raise InputRejected(f"{prediction}: prediction of case {item['name']} ({item['pattern']}) not found.")
        check_same_grid(prediction, item["label"])
        label = nib.load(item["label"])
        truth, predicted = np.asanyarray(label.dataobj), np.asanyarray(nib.load(prediction).dataobj)
        voxel_ml = float(np.prod(label.header.get_zooms()[:3])) / 1000.0
        record = {"case": item["name"], "pattern": item["pattern"], **lesion_metrics(predicted, truth, voxel_ml)}
        if int(truth.max(initial=0)) <= 3 and int(predicted.max(initial=0)) <= 3:
            record.update(brats_region_dice(predicted, truth))
        per_case.append(record)
    by_pattern = summarise(per_case, key="pattern")
    regions = [k for k in ("dice_whole_tumour", "dice_tumour_core", "dice_enhancing_tumour", "dice_regions")
               if all(k in r for r in per_case)]  # fmt: skip
    for pattern, group in by_pattern["groups"].items():
        mine = [r for r in per_case if r["pattern"] == pattern]
        group.update({k: float(np.mean([r[k] for r in mine])) for k in regions})
    results: dict[str, Any] = {
        "model": {**model_info(args.model), "mome_plus": True, "profile": args.profile or _bundle_profile(args.model)},
        "data": str(args.data.resolve()),
        "modalities": modalities,
        "per_case": per_case,
        "per_pattern": by_pattern["groups"],
        "overall": by_pattern["overall"],
    }
    if pred_dir != scratch:
        results["predictions"] = str(pred_dir.resolve())
    return results


def _write_results(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    """Evaluates with parsed arguments (the bundle's ``scripts`` already importable); returns the exit code."""
    if args.device == "cuda" and args.predictions is None:
        import torch

        if not torch.cuda.is_available():
            print("mome-eval: --device cuda: no CUDA device available.", file=sys.stderr)
            return EXIT_USAGE
    try:
        with tempfile.TemporaryDirectory(prefix="mome-eval-") as scratch:
            results = _evaluate(args, Path(scratch))
        if args.out is not None:
            _write_results(results, args.out)
    except InputRejected as err:
        print(f"mome-eval: input rejected: {err}", file=sys.stderr)
        return EXIT_REJECTED
    except Exception as err:  # noqa: BLE001 - report, never a traceback-only failure
        logger.exception("internal error")
        print(f"mome-eval: internal error: {err}", file=sys.stderr)
        return EXIT_INTERNAL
    print(format_table(results))
    if args.out is not None:
        print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    from app.cli import eval_main

    sys.exit(eval_main())
