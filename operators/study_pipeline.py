"""The stages of the DICOM pipeline as plain functions: route a study, segment its series, write SEGs, report, commit.

The Deploy application's operators (``*_operator.py``) each call one stage, and ``app.dicom_pipeline.run_dicom``
calls them in sequence without Holoscan, so both paths produce identical outputs. A :class:`StudyWork` travels
through the stages and collects, per study, the routing decision for every series, the segmented volumes and the
report entries. Expected problems (a series that cannot become a volume, a study with nothing to segment) are
recorded, never raised mid-graph; :func:`commit` decides at the end whether anything is written.

Per study (``OUT/<StudyInstanceUID>/``): ``seg_<SeriesInstanceUID>.dcm`` (DICOM-SEG), ``sr_<SeriesInstanceUID>.dcm``
(TID 1500 SR with the lesion volume, referencing the SEG), ``qc_<SeriesInstanceUID>.png`` and ``report.json``.
Outputs are staged in a hidden sibling folder of ``OUT`` (same file system) and moved into place by ``os.replace``
only when at least one series was segmented, so a rejected input leaves nothing behind. Patient names and IDs are
never logged or reported; studies, series and instances are named by their UIDs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from operators.dicom_series import SeriesRejected, SeriesVolume, series_to_volume
from operators.modality_router import MODALITIES, SeriesHeader, choose, classify
from operators.qc_image import qc_caption, save_qc_png
from operators.seg_writer import build_seg
from operators.sr_writer import build_volume_sr

__all__ = [
    "NothingToSegment",
    "SeriesTask",
    "StudyWork",
    "commit",
    "nothing_to_segment_reason",
    "read_pixels",
    "route_study",
    "segment_study",
    "staging_dir",
    "write_report",
    "write_segs",
]

Progress = Callable[[str], None]


class NothingToSegment(ValueError):
    """No series of the input could be segmented; the message lists why."""


@dataclass
class SeriesTask:
    """One series the router chose, its instances (headers or full datasets) and, once segmented, the results."""

    modality: str
    header: SeriesHeader
    instances: list[Any]
    volume: SeriesVolume | None = None
    segmentation: Any = None  # scripts.pipeline.NativeSegmentation
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class StudyWork:
    """Everything the stages know about one study; ``entries`` become the report's per-series ``segmented``."""

    study_uid: str
    decisions: list[dict[str, Any]]
    tasks: list[SeriesTask]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped_files: int = 0
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def segmented_series(self) -> int:
        return sum("seg" in entry for entry in self.entries.values())


def route_study(
    study_uid: str,
    series: Mapping[str, Sequence[Any]],
    rules: Sequence[dict[str, Any]],
    modalities: Sequence[str] = MODALITIES,
    all_series: bool = False,
) -> StudyWork:
    """Classifies every series of a study (``series``: SeriesInstanceUID -> instances) and picks what to segment.

    Each decision records ``selected`` and, for a supported series that is not segmented, ``not_selected`` (its
    modality was not requested, or another series of that modality is preferred).
    """
    routed, by_uid = [], {}
    for series_uid, instances in sorted(series.items()):
        # one Enhanced (multi-frame) instance counts its frames
        header = SeriesHeader.from_dataset(instances[0], n_instances=len(instances) if len(instances) > 1 else None)
        routed.append((header, classify(header, rules)))
        by_uid[series_uid] = instances
    chosen = choose(routed, modalities, all_series)
    selected = {header.series_uid for headers in chosen.values() for header in headers}
    decisions = []
    for header, decision in routed:
        record = {**decision.to_dict(), "instances": len(by_uid[header.series_uid])}
        record["selected"] = header.series_uid in selected
        if decision.modality and not record["selected"]:
            requested = decision.modality in modalities
            record["not_selected"] = "another series preferred" if requested else "modality not requested"
        decisions.append(record)
    tasks = [
        SeriesTask(modality, header, list(by_uid[header.series_uid]))
        for modality, headers in sorted(chosen.items())
        for header in headers
    ]
    return StudyWork(study_uid, decisions, tasks)


def read_pixels(instances: Sequence[Any], name: str) -> list[Any]:
    """Full datasets: instances read without pixel data (``stop_before_pixels``) are read again from their file.

    Raises:
        SeriesRejected: an instance has no pixel data or its file cannot be read (named by SOPInstanceUID).
    """
    full = []
    for ds in instances:
        if "PixelData" not in ds and getattr(ds, "filename", None):
            try:
                ds = pydicom.dcmread(ds.filename)
            except Exception as error:  # truncated or vanished file: pydicom raises several types
                uid = getattr(ds, "SOPInstanceUID", "?")
                raise SeriesRejected(f"{name}: instance {uid} cannot be read ({type(error).__name__}).") from error
        if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise SeriesRejected(f"{name}: instance {getattr(ds, 'SOPInstanceUID', '?')} has no pixel data.")
        full.append(ds)
    return full


def _segment_task(task: SeriesTask, segmenter: Any, say: Progress) -> None:
    name = f"series {task.header.series_uid}"
    started = time.perf_counter()
    task.volume = series_to_volume(read_pixels(task.instances, name))
    task.seconds["dicom_load"] = time.perf_counter() - started
    task.segmentation = segmenter.segment(
        task.volume.array, task.volume.affine, name=name, modality=task.modality, progress=say
    )
    task.seconds.update(task.segmentation.seconds)


def segment_study(work: StudyWork, segmenter: Any, say: Progress | None = None) -> StudyWork:
    """Runs MoME on every chosen series; a series that cannot become a volume is recorded as rejected."""
    say = say or (lambda _: None)
    work.model = segmenter.describe()
    for task in work.tasks:
        say(f"study {work.study_uid}: {task.modality} series {task.header.series_uid}")
        try:
            _segment_task(task, segmenter, say)
        except SeriesRejected as error:
            say(f"series {task.header.series_uid} rejected: {error}")
            work.entries[task.header.series_uid] = {"modality": task.modality, "rejected": str(error)}
    return work


def write_segs(work: StudyWork, study_dir: Path) -> StudyWork:
    """One DICOM-SEG per segmented series on its exact source grid, and its volume SR, into ``study_dir``."""
    from scripts.metrics import lesion_summary

    study_dir.mkdir(parents=True, exist_ok=True)
    name, version = str(work.model.get("name") or "MoME"), str(work.model.get("version") or "unknown")
    for task in work.tasks:
        if task.segmentation is None:
            continue
        started = time.perf_counter()
        seg = build_seg(task.volume, task.segmentation.labels, name, version)
        path = study_dir / f"seg_{task.volume.series_uid}.dcm"
        seg.save_as(path)
        task.seconds["seg_write"] = time.perf_counter() - started
        voxel_ml = abs(float(np.linalg.det(task.volume.affine[:3, :3]))) / 1000.0
        lesions = lesion_summary(task.segmentation.labels, voxel_ml)
        sr = build_volume_sr(seg, task.volume.instances, lesions["lesion_volume_ml"], name, version)
        sr_path = study_dir / f"sr_{task.volume.series_uid}.dcm"
        sr.save_as(sr_path)
        registration = task.segmentation.registration.to_dict()
        work.entries[task.header.series_uid] = {
            "modality": task.modality,
            "series_number": task.header.series_number,
            "description": task.header.description,
            "shape": list(task.volume.array.shape),
            **lesions,
            "registration": registration,
            "warnings": list(registration["warnings"]),
            "inference": getattr(task.segmentation, "inference", {}),
            "seg": {
                "file": path.name,
                "sop_instance_uid": str(seg.SOPInstanceUID),
                "series_instance_uid": str(seg.SeriesInstanceUID),
                "series_number": int(seg.SeriesNumber),
                "frames": int(seg.NumberOfFrames),
            },
            "sr": {"file": sr_path.name, "sop_instance_uid": str(sr.SOPInstanceUID)},
        }
    return work


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
    }


def write_report(work: StudyWork, study_dir: Path) -> dict[str, Any]:
    """QC PNG per segmented series and ``report.json`` for the study; returns the report."""
    for task in work.tasks:
        entry = work.entries.get(task.header.series_uid, {})
        if "seg" not in entry:
            continue
        started = time.perf_counter()
        caption = qc_caption(f"{task.modality} series {task.header.series_number}", entry, work.model)
        path = study_dir / f"qc_{task.volume.series_uid}.png"
        save_qc_png(task.volume.array, task.segmentation.labels, task.volume.affine, path, caption)
        task.seconds["qc_png"] = time.perf_counter() - started
        entry["qc_png"] = path.name
        entry["seconds"] = {key: round(value, 2) for key, value in task.seconds.items()}
    report = {
        "study_instance_uid": work.study_uid,
        "model": work.model,
        "summary": _study_summary(work),
        "series": work.decisions,
        "segmented": work.entries,
        "skipped_non_dicom_files": work.skipped_files,
    }
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def staging_dir(out: Path) -> Path:
    """A hidden, empty folder beside ``out`` (same file system, so :func:`commit` moves are atomic renames)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.mome-", dir=out.parent))


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
    """Moves each study's staged outputs to ``out/<StudyInstanceUID>`` and removes the staging folder.

    Raises:
        NothingToSegment: no study has a segmented series; nothing is written and staging is removed.
    """
    try:
        if not any(work.segmented_series for work in works):
            raise NothingToSegment(f"{source}: no series could be segmented ({nothing_to_segment_reason(works)}).")
        out.mkdir(parents=True, exist_ok=True)
        for work in works:
            target = out / work.study_uid
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / work.study_uid, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
