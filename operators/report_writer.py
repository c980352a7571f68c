"""The report stage: a QC image per segmented series, ``report.json`` per study, then the commit into the output folder.

Per study (``OUT/<StudyInstanceUID>/``): ``seg_<SeriesInstanceUID>.dcm`` (DICOM-SEG), ``sr_<SeriesInstanceUID>.dcm``
(TID 1500 SR with the lesion volume, referencing the SEG), ``qc_<SeriesInstanceUID>.png`` and ``report.json``.
Outputs are staged in a hidden sibling folder of ``OUT`` (same file system, :func:`operators.output_folder.staging_dir`)
and moved into place only when at least one series was segmented (:func:`commit`), so a rejected input leaves nothing
behind. A re-run replaces only the files that the previous run's manifest (``.mome-manifest.json``) lists; other files
stay. Patient names and IDs are never logged or reported; studies, series and instances are named by their UIDs.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from operators.modality_router import MODALITIES
from operators.output_folder import Staged, publish
from operators.phi import redact_values
from operators.qc_image import qc_caption, save_qc_png
from operators.study import NothingToSegment, StudyWork

__all__ = ["commit", "nothing_to_segment_reason", "write_report"]

logger = logging.getLogger(__name__)


def _study_summary(work: StudyWork) -> dict[str, Any]:
    done = [entry for entry in work.entries.values() if "seg" in entry]
    return {
        "series_in_study": len(work.decisions),
        "segmented_series": len(done),
        "rejected_series": sum("rejected" in entry for entry in work.entries.values()),
        "modalities_segmented": sorted({entry["modality"] for entry in done}, key=MODALITIES.index),
        "lesion_volume_ml": {entry["modality"]: entry["lesion_volume_ml"] for entry in done},
        "max_lesion_volume_ml": max((entry["lesion_volume_ml"] for entry in done), default=None),
        "warnings": sorted({warning for entry in done for warning in entry["warnings"]}),
        **_plus_summary(done),
    }


def _plus_summary(done: Sequence[dict[str, Any]]) -> dict[str, Any]:
    plus = [entry for entry in done if entry.get("mode") == "mome_plus"]
    if not plus:
        return {}
    keys = ("reference_modality", "modalities_available", "modalities_missing", "region_volume_ml")
    return {"mome_plus": {key: plus[0][key] for key in keys}}


def write_report(work: StudyWork, study_dir: Path) -> dict[str, Any]:
    """QC PNG per segmented series and ``report.json`` for the study; returns the report."""
    for task in work.tasks:
        entry = work.entries.get(task.header.series_uid, {})
        if "seg" not in entry:
            continue
        started = time.perf_counter()
        subject = f"{task.modality} series {task.header.series_number}"
        if entry.get("mode") == "mome_plus":
            subject = f"MoME+ ({'+'.join(entry['modalities_available'])}) on {subject}"
        caption = qc_caption(subject, entry, work.model)
        path = study_dir / f"qc_{task.volume.series_uid}.png"
        save_qc_png(task.volume.array, task.segmentation.labels, task.volume.affine, path, caption)
        task.seconds["qc_png"] = time.perf_counter() - started
        entry["qc_png"] = path.name
        entry["seconds"] = {key: round(value, 2) for key, value in task.seconds.items()}
    report = {
        "study_instance_uid": work.study_uid,
        "model": work.model,
        "summary": _study_summary(work),
        # descriptions and reasons quote header text: without patient names and IDs (operators/phi.py)
        "series": redact_values(work.decisions),
        "segmented": redact_values(work.entries),
        "skipped_non_dicom_files": work.skipped_files,
    }
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "report.json").write_text(json.dumps(report, indent=2))
    logger.info("study %s: report written (%d series segmented)", work.study_uid, work.segmented_series)
    return report


def nothing_to_segment_reason(works: Sequence[StudyWork]) -> str:
    """Why no series was segmented: the series rejected while loading, else every routing decision."""
    rejected = [entry["rejected"] for work in works for entry in work.entries.values() if "rejected" in entry]
    if rejected:
        return "; ".join(rejected)
    reasons = [
        f"{d['description'] or d['series_uid']}: {d.get('not_selected') or d['reason']}"
        for work in works
        for d in work.decisions
    ]
    return "; ".join(reasons) or "no DICOM image instances"


def commit(staging: Path, out: Path, works: Sequence[StudyWork], source: str = "input") -> None:
    """Publishes each study's staged outputs into ``out/<StudyInstanceUID>`` and removes the staging folder.

    A re-run replaces only the files MoME wrote there (:func:`operators.output_folder.publish`); other files stay.

    Raises:
        NothingToSegment: no study has a segmented series; nothing is written and staging is removed.
        UnusableOutputFolder: a study folder cannot receive the files; nothing is written and staging is removed.
    """
    try:
        if not any(work.segmented_series for work in works):
            raise NothingToSegment(f"{source}: no series could be segmented ({nothing_to_segment_reason(works)}).")
        publish([Staged(staging / work.study_uid, out / work.study_uid, work.study_uid) for work in works])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
