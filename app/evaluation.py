"""Evaluation of a MoME bundle on any labelled NIfTI dataset (the API behind ``mome-eval``, :mod:`app.cli.eval`).

Cases come from a labelled NIfTI dataset (:mod:`app.datasets`: ``dataset.json`` or nnU-Net folders). Unless
``predictions`` (``--predictions``) is given, the bundle's own ``configs/inference.json`` segments the images;
predictions are kept in ``<out stem>_predictions/`` next to ``out`` (``--out``).
Metrics are those of the bundle's ``scripts.metrics``.

MoME+ datasets (``dataset.json`` entries whose ``image`` lists one file per channel, as written by
``scripts.synthetic --multichannel``) are evaluated with the bundle's MoME+ model (``configs/inference_plus.json``)
once per availability pattern (``patterns``, ``--patterns``: ``all`` = the 15 non-empty subsets of T1, T1ce, T2,
FLAIR (default), or names like ``t1ce+flair``); results are grouped per pattern and, for BraTS labels, include the
Dice of the whole tumour, tumour core and enhancing tumour. A pattern needing a channel a case lacks skips that case.

:func:`evaluate` raises :class:`app.errors.UsageError` for a call that cannot run (a data, model or predictions folder
that is not usable, CUDA asked for where there is none, an unknown device or profile) and
:class:`app.errors.InputRejected` for input that cannot be evaluated (no cases, a missing label or prediction, a
prediction not on its label's grid); no results file is written then.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from app.datasets import (
    Case,
    check_same_grid,
    discover_cases,
    is_multichannel,
    modality_of,
    prediction_path,
    select_cases,
)
from app.errors import InputRejected, UsageError
from app.nifti_io import nifti_stem
from operators.bundle import profile_names, use_bundle_scripts, voxel_ml
from operators.study import DEVICES

__all__ = [
    "Case",
    "build_results",
    "check_same_grid",
    "discover_cases",
    "evaluate",
    "evaluate_case",
    "format_table",
    "is_multichannel",
    "modality_of",
    "model_info",
    "nifti_stem",
    "plus_patterns",
    "prediction_path",
    "run_inference",
    "run_plus_inference",
    "select_cases",
]

BUNDLE_FILES = ("configs/inference.json", "scripts/__init__.py", "scripts/metrics.py")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Settings:
    """One evaluation run, as checked by :func:`evaluate`."""

    data: Path
    model: Path
    predictions: Path | None  # given predictions: no inference
    device: str | None
    profile: str | None
    cases: tuple[str, ...] | None
    patterns: tuple[str, ...]


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

    logger.info("running %s of %s on %d item(s)", config, bundle, len(datalist))
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
    truth = np.asanyarray(label.dataobj)
    predicted = np.asanyarray(nib.load(prediction).dataobj)
    record: dict[str, Any] = {"case": case.case, "modality": case.modality}
    if case.lesion_type is not None:
        record["lesion_type"] = case.lesion_type
    record["image"] = _relative(case.image, data_dir)
    record["label"] = _relative(case.label, data_dir)
    return {**record, **lesion_metrics(predicted, truth, voxel_ml(label.affine))}


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


def _predictions_dir(predictions: Path | None, out: Path | None, scratch: Path) -> Path:
    """The given predictions, else ``<out stem>_predictions/`` next to ``out`` (created), else ``scratch``."""
    if predictions is not None:
        return predictions
    if out is not None:
        kept = out.parent / f"{nifti_stem(out)}_predictions"
        kept.mkdir(parents=True, exist_ok=True)
        return kept
    return scratch


def _evaluate_single(settings: _Settings, out: Path | None, scratch: Path) -> dict[str, Any]:
    cases = select_cases(discover_cases(settings.data), settings.cases, settings.data)
    pred_dir = _predictions_dir(settings.predictions, out, scratch)
    if settings.predictions is None:
        for case in cases:
            check_same_grid(case.label, case.image)
        run_inference(settings.model, cases, settings.data, pred_dir, settings.device, settings.profile)
    per_case = [evaluate_case(case, prediction_path(pred_dir, case.image), settings.data) for case in cases]
    profile = None if settings.predictions else (settings.profile or _bundle_profile(settings.model))
    results = build_results(settings.model, settings.data, per_case, profile)
    if pred_dir != scratch:
        results["predictions"] = str(pred_dir.resolve())
    return results


def _plus_modalities(bundle: Path) -> list[str]:
    from operators.bundle import installed_models

    if not installed_models(bundle).plus:
        raise InputRejected(
            f"{bundle}: the dataset is multi-channel (MoME+), but the bundle has no MoME+ model "
            "(configs/inference_plus.json with models/model_plus.pt)."
        )
    return [str(m) for m in json.loads((bundle / "configs" / "inference_plus.json").read_text())["modalities"]]


def plus_patterns(wanted: Sequence[str], modalities: Sequence[str]) -> list[tuple[int, ...]]:
    """Availability vectors for ``wanted`` patterns (``all`` or ``+``-joined modality names)."""
    from scripts.plus import availability_patterns, pattern_name

    every = availability_patterns(len(modalities))
    if list(wanted) == ["all"]:
        return every
    by_name = {pattern_name(p, modalities): p for p in every}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise InputRejected(f"--patterns {unknown}: not subsets of {'+'.join(modalities)} written in that order.")
    return [by_name[w] for w in wanted]


def _plus_items(
    data: Path, wanted: Sequence[str] | None, patterns: Sequence[str], modalities: Sequence[str]
) -> list[dict[str, Any]]:
    """One inference item per case (``wanted``, default all) and pattern, with the pattern's channels (``None`` =
    withheld)."""
    from monai.data import load_decathlon_datalist

    from scripts.plus import pattern_name

    dataset_json = data / "dataset.json"
    entries = load_decathlon_datalist(dataset_json, data_list_key="training", base_dir=data)
    names = [str(e.get("case") or nifti_stem(Path(e["label"]))) for e in entries]
    unknown = sorted(set(wanted or []) - set(names))
    if unknown:
        raise InputRejected(f"{data}: no such case(s): {', '.join(unknown)}.")
    items = []
    for name, entry in zip(names, entries):
        if wanted and name not in wanted:
            continue
        files = [Path(f) if f else None for f in entry["image"]]
        if len(files) != len(modalities):
            raise InputRejected(
                f"{dataset_json}: case {name} has {len(files)} channel files, the model {len(modalities)}."
            )
        for path in [f for f in files if f is not None] + [Path(entry["label"])]:
            if not path.is_file():
                raise InputRejected(f"{path}: file of case {name} not found.")
        for pattern in plus_patterns(patterns, modalities):
            if any(flag and files[k] is None for k, flag in enumerate(pattern)):
                continue
            channels = [str(files[k]) if flag else None for k, flag in enumerate(pattern)]
            key = f"{name}__{pattern_name(pattern, modalities)}"
            items.append({"image": channels, "case": key, "label": Path(entry["label"]), "name": name,
                          "pattern": pattern_name(pattern, modalities)})  # fmt: skip
    if not items:
        raise InputRejected(f"{data}: no case has the channels of the requested patterns.")
    return items


def run_plus_inference(
    bundle: Path, items: Sequence[dict[str, Any]], out_dir: Path, device: str | None, profile: str | None = None
) -> None:
    """Runs the bundle's ``configs/inference_plus.json``; writes ``<case>__<pattern>_seg.nii.gz`` to ``out_dir``."""
    datalist = [{"image": item["image"], "case": item["case"]} for item in items]
    _run_workflow(bundle, "inference_plus.json", datalist, out_dir, device, profile)


def _evaluate_plus(settings: _Settings, out: Path | None, scratch: Path) -> dict[str, Any]:
    from scripts.metrics import brats_region_dice, lesion_metrics, summarise

    modalities = _plus_modalities(settings.model)
    items = _plus_items(settings.data, settings.cases, settings.patterns, modalities)
    pred_dir = _predictions_dir(settings.predictions, out, scratch)
    if settings.predictions is None:
        run_plus_inference(settings.model, items, pred_dir, settings.device, settings.profile)
    per_case = []
    for item in items:
        prediction = pred_dir / f"{item['case']}_seg.nii.gz"
        if not prediction.is_file():
            raise InputRejected(f"{prediction}: prediction of case {item['name']} ({item['pattern']}) not found.")
        check_same_grid(prediction, item["label"])
        label = nib.load(item["label"])
        truth, predicted = np.asanyarray(label.dataobj), np.asanyarray(nib.load(prediction).dataobj)
        metrics = lesion_metrics(predicted, truth, voxel_ml(label.affine))
        record = {"case": item["name"], "pattern": item["pattern"], **metrics}
        if int(truth.max(initial=0)) <= 3 and int(predicted.max(initial=0)) <= 3:
            record.update(brats_region_dice(predicted, truth))
        per_case.append(record)
    by_pattern = summarise(per_case, key="pattern")
    regions = [k for k in ("dice_whole_tumour", "dice_tumour_core", "dice_enhancing_tumour", "dice_regions")
               if all(k in r for r in per_case)]  # fmt: skip
    for pattern, group in by_pattern["groups"].items():
        mine = [r for r in per_case if r["pattern"] == pattern]
        group.update({k: float(np.mean([r[k] for r in mine])) for k in regions})
    profile = settings.profile or _bundle_profile(settings.model)
    results: dict[str, Any] = {
        "model": {**model_info(settings.model), "mome_plus": True, "profile": profile},
        "data": str(settings.data.resolve()),
        "modalities": modalities,
        "per_case": per_case,
        "per_pattern": by_pattern["groups"],
        "overall": by_pattern["overall"],
    }
    if pred_dir != scratch:
        results["predictions"] = str(pred_dir.resolve())
    return results


def _checked_settings(
    data: Path,
    model: Path,
    predictions: Path | None,
    device: str | None,
    profile: str | None,
    cases: Sequence[str] | None,
    patterns: Sequence[str],
) -> _Settings:
    """The run's settings once the folders, device and profile are usable; puts the bundle's scripts on the path."""
    data, model = Path(data), Path(model)
    if not data.is_dir():
        raise UsageError(f"--data {data}: no such folder.")
    missing = [name for name in BUNDLE_FILES if not (model / name).is_file()]
    if missing:
        raise UsageError(f"--model {model}: not a usable MoME bundle (no {', '.join(missing)}; re-run mome-convert).")
    if predictions is not None and not Path(predictions).is_dir():
        raise UsageError(f"--predictions {predictions}: no such folder.")
    if device is not None and device not in DEVICES:
        raise UsageError(f"--device {device}: not one of {', '.join(DEVICES)}.")
    if isinstance(cases, str) or isinstance(patterns, str) or not patterns:
        raise UsageError("cases and patterns are sequences of names; patterns needs at least one ('all').")
    use_bundle_scripts(model)
    if profile is not None and profile not in profile_names():
        raise UsageError(f"--profile {profile}: not one of {', '.join(profile_names())}.")
    if device == "cuda" and predictions is None:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device available.")
    return _Settings(
        data=data,
        model=model,
        predictions=None if predictions is None else Path(predictions),
        device=device,
        profile=profile,
        cases=None if cases is None else tuple(cases),
        patterns=tuple(patterns),
    )


def evaluate(
    data: Path,
    model: Path,
    *,
    out: Path | None = None,
    predictions: Path | None = None,
    device: str | None = None,
    profile: str | None = None,
    cases: Sequence[str] | None = None,
    patterns: Sequence[str] = ("all",),
) -> dict[str, Any]:
    """Evaluates the bundle ``model`` on the labelled dataset ``data`` (see the module docstring); returns the results.

    Args:
        data: Dataset folder (``dataset.json`` or ``imagesTr``/``labelsTr``).
        model: MoME bundle folder (e.g. made by ``mome-convert``); its ``scripts`` are put on ``sys.path``.
        out: Results JSON to write; the predictions are then kept in ``<out stem>_predictions/`` next to it.
        predictions: Skip inference and read ``<predictions>/<image stem>_seg.nii.gz`` instead.
        device: ``cpu`` or ``cuda`` (default: the bundle's choice, CUDA if available).
        profile: Inference profile of the bundle (default: the bundle's).
        cases: Evaluate only these case ids (default: all).
        patterns: MoME+ datasets: availability patterns, ``("all",)`` or names like ``t1ce+flair``.

    Returns:
        The results document: ``model``, ``data``, ``per_case``, ``per_modality`` (MoME+: ``modalities`` and
        ``per_pattern``), ``overall``, ``per_lesion_type`` where cases have one and ``predictions`` where they are kept.

    Raises:
        UsageError: ``data``, ``model`` or ``predictions`` is not a usable folder, ``device`` is ``cuda`` without a CUDA
            device (and inference is needed), or ``device`` / ``profile`` is unknown.
        InputRejected: no cases, an unknown case or pattern, a missing image, label or prediction, a prediction not on
            its label's grid, a MoME+ dataset for a bundle without MoME+; nothing is written to ``out``.
    """
    settings = _checked_settings(data, model, predictions, device, profile, cases, patterns)
    out = None if out is None else Path(out)
    with tempfile.TemporaryDirectory(prefix="mome-eval-") as scratch:
        if is_multichannel(settings.data):
            results = _evaluate_plus(settings, out, Path(scratch))
        else:
            results = _evaluate_single(settings, out, Path(scratch))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", out)
    return results
