"""The public Python API: segment a DICOM study or a NIfTI volume, evaluate a bundle — from a script, a notebook or
another service, with the same code paths as the commands.

Example::

    from pathlib import Path
    from app.api import segment_nifti, segment_study

    study = segment_study(Path("study.zip"), Path("out"))           # DICOM-SEG, SR, QC PNG, report per study
    print(study.reports[0]["summary"]["lesion_volume_ml"])
    scan = segment_nifti(Path("sub-01_flair.nii.gz"), Path("out"))   # label map on the input grid + QC + report
    print(scan.report["lesion_volume_ml"], scan.segmentation)

Failures are raised, never printed (:mod:`app.errors` lists the kinds; the commands map them to exit codes).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.app import AppOptions, StudyResults, run_app
from app.evaluation import evaluate
from app.nifti_io import guess_modality, load_volume, nifti_stem, save_nifti
from operators import output_folder, qc_image
from operators.bundle import choose_models, lesion_summary, load_segmenters, resolve_bundle
from operators.limits import InputLimits
from operators.modality_router import MODALITIES
from operators.output_folder import Staged, check_output_folder, publish
from operators.study import Mode, Segmentation, Segmenter

__all__ = ["AppOptions", "NiftiResult", "StudyResults", "evaluate", "segment_nifti", "segment_study"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NiftiResult:
    """What :func:`segment_nifti` wrote and found."""

    segmentation: Path  # OUT/<name>_seg.nii.gz: uint8 labels on the input's grid
    qc_png: Path
    report_file: Path  # OUT/report.json
    report: dict[str, Any]  # modality, lesion volume (mL), count, registration quality, timings, model


def segment_study(
    source: Path,
    out: Path,
    *,
    model: Path | None = None,
    modalities: Sequence[str] = MODALITIES,
    all_series: bool = False,
    rules_file: Path | None = None,
    mode: Mode = "auto",
    device: str | None = None,
    tta: bool = False,
    profile: str | None = None,
    progress: Callable[[str], None] | None = None,
    limits: InputLimits | None = None,
    options: AppOptions | None = None,
) -> StudyResults:
    """Segments every study of a DICOM folder tree or zip with the Deploy application's graph (as ``python -m app``).

    Per study ``out/<StudyInstanceUID>/``: ``seg_<SeriesInstanceUID>.dcm`` (DICOM-SEG on the series' exact grid),
    ``sr_<SeriesInstanceUID>.dcm``, ``qc_<SeriesInstanceUID>.png`` and ``report.json`` (every routing decision with its
    reason, volumes, registration quality, timings, UIDs). ``options`` replaces the keyword settings altogether
    (e.g. to pass your own segmenter).

    Raises:
        FileNotFoundError: ``model`` names no such folder.
        The errors of :func:`app.app.run_app` (nothing is written when one is raised).
    """
    options = options or AppOptions(
        modalities=tuple(modalities),
        all_series=all_series,
        rules_file=rules_file,
        device=device,
        tta=tta,
        progress=progress,
        profile=profile,
        mode=mode,
        limits=limits,
    )
    return run_app(Path(source), Path(out), _bundle(model), options)


def segment_nifti(
    source: Path,
    out: Path,
    *,
    model: Path | None = None,
    modality: str | None = None,
    device: str | None = None,
    tta: bool = False,
    profile: str | None = None,
    save_mni: bool = False,
    progress: Callable[[str], None] | None = None,
    limits: InputLimits | None = None,
) -> NiftiResult:
    """Segments a native-space NIfTI MR volume; results on the input's own grid, published into ``out``.

    Steps: affine registration to the MNI152 2009a template, resampling into brain-masked MoME space, MoME inference
    with the bundle's inferer, class probabilities mapped back through the inverse transform and argmax on the input
    grid. Writes ``<name>_seg.nii.gz``, ``<name>_qc.png``, ``report.json`` and, with ``save_mni``,
    ``<name>_mni.nii.gz`` / ``<name>_mni_seg.nii.gz`` (the registered image and its labels on the MoME grid).
    ``modality`` (default: from a ``_t1``/``_flair``... file-name suffix) picks the registration template's contrast.

    Raises:
        UnusableOutputFolder: ``out`` cannot receive results (checked before the model or the input is read).
        InputRejected: the file cannot be read as one 3-D volume, or is over a limit.
        VolumeRejected: the volume or its registration fails the bundle's checks (``scripts.registration``).
        FileNotFoundError: no such model.
    """
    source, out = Path(source), check_output_folder(Path(out))
    say = progress or (lambda _: None)
    started = time.perf_counter()
    bundle = _bundle(model)
    choose_models(bundle, "single")  # a bundle without MoME weights fails here, before the input is read
    array, affine, header = load_volume(source, limits)
    say(f"loading the model from {bundle}")
    segmenter = _load_segmenter(bundle, device, tta, profile)
    guessed = guess_modality(source)
    result = segmenter.segment(array, affine, name=str(source), modality=modality or guessed, progress=say)
    report = _nifti_report(source, array, affine, result, modality or guessed, segmenter.describe(), tta, save_mni)
    report["modality_source"] = "--modality" if modality else "file name" if guessed else None
    for warning in report["warnings"]:
        say(f"WARNING: {warning}")
    _write_nifti_outputs(source, out, array, affine, header, result, report, save_mni, started)
    lesions = f"{report['lesion_volume_ml']} mL in {report['lesion_count']} lesion(s)"
    say(f"done: {lesions} -> {out / report['outputs']['segmentation']}")
    outputs = report["outputs"]
    return NiftiResult(out / outputs["segmentation"], out / outputs["qc_png"], out / "report.json", report)


def _load_segmenter(bundle: Path, device: str | None, tta: bool, profile: str | None) -> Segmenter:
    """The bundle's single-contrast MoME."""
    segmenter = load_segmenters(bundle, "single", device, tta, profile).single
    assert segmenter is not None  # choose_models raises otherwise
    return segmenter


def _bundle(model: Path | None) -> Path:
    """The bundle ``model`` names (it must exist), else the installed one."""
    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"{model}: no such model folder.")
    return resolve_bundle(Path(model) if model else None)


def _nifti_report(
    source: Path,
    array: np.ndarray,
    affine: np.ndarray,
    result: Segmentation,
    modality: str | None,
    model: dict[str, Any],
    tta: bool,
    save_mni: bool,
) -> dict[str, Any]:
    stem = nifti_stem(source)
    registration = result.registration.to_dict()
    report = {
        "input": source.name,
        "modality": modality,
        "shape": list(array.shape),
        "voxel_size_mm": np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist(),
        **lesion_summary(result.labels, affine),
        "registration": registration,
        "warnings": list(registration["warnings"]),
        "model": model,
        "tta": bool(tta),
        "inference": result.inference,
        "outputs": {"segmentation": f"{stem}_seg.nii.gz", "qc_png": f"{stem}_qc.png"},
    }
    if save_mni:
        report["outputs"].update(mni_image=f"{stem}_mni.nii.gz", mni_segmentation=f"{stem}_mni_seg.nii.gz")
    return report


def _write_nifti_outputs(
    source: Path,
    out: Path,
    array: np.ndarray,
    affine: np.ndarray,
    header: Any,
    result: Segmentation,
    report: dict[str, Any],
    save_mni: bool,
    started: float,
) -> None:
    """Stages every output beside ``out`` and publishes them together (nothing partial on failure)."""
    outputs, staged = report["outputs"], output_folder.staging_dir(out)
    try:
        save_nifti(result.labels, affine, staged / outputs["segmentation"], header)
        caption = qc_image.qc_caption(report["modality"] or "MR", report, report["model"])
        qc_image.save_qc_png(array, result.labels, affine, staged / outputs["qc_png"], caption)
        if save_mni:
            save_nifti(result.mome_image.astype(np.float32), result.mome_affine, staged / outputs["mni_image"])
            save_nifti(result.mome_labels, result.mome_affine, staged / outputs["mni_segmentation"])
        report["seconds"] = {key: round(value, 2) for key, value in result.seconds.items()}
        report["seconds"]["total"] = round(time.perf_counter() - started, 2)
        (staged / "report.json").write_text(json.dumps(report, indent=2))
        publish([Staged(staged, out, source.name)])
    finally:
        shutil.rmtree(staged, ignore_errors=True)
