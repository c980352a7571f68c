"""The stages of the DICOM pipeline as plain functions: route a study, segment its series, write SEGs, report, commit.

The Deploy application's operators (``*_operator.py``) each call one stage, and ``app.dicom_pipeline.run_dicom``
calls them in sequence without Holoscan, so both paths produce identical outputs. A :class:`StudyWork` travels
through the stages and collects, per study, the routing decision for every series, the segmented volumes and the
report entries. Expected problems (a series that cannot become a volume, a study with nothing to segment) are
recorded, never raised mid-graph; :func:`commit` decides at the end whether anything is written.

MoME+ (``mode`` ``plus``, or ``auto`` with a MoME+ model and at least two of its modalities in the study): the chosen
series of T1, T1ce, T2 and FLAIR are segmented together; the result lies on the reference series (the finest grid)
and its SEG references every contributing series. Other series (DWI) still go through single-modality MoME.

Per study (``OUT/<StudyInstanceUID>/``): ``seg_<SeriesInstanceUID>.dcm`` (DICOM-SEG), ``sr_<SeriesInstanceUID>.dcm``
(TID 1500 SR with the lesion volume, referencing the SEG), ``qc_<SeriesInstanceUID>.png`` and ``report.json``.
Outputs are staged in a hidden sibling folder of ``OUT`` (same file system) and moved into place by ``os.replace``
only when at least one series was segmented, so a rejected input leaves nothing behind. A re-run replaces only the
files that the previous run's manifest (``.mome-manifest.json``) lists; other files stay. Patient names and IDs are
never logged or reported; studies, series and instances are named by their UIDs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from operators.clean_stop import CREATED, STAGING, record_path
from operators.dicom_series import SeriesRejected, SeriesVolume, series_to_volume
from operators.limits import InputLimits, check_series
from operators.modality_router import MODALITIES, SeriesHeader, choose, classify
from operators.output_folder import Staged, missing_folders, publish
from operators.phi import redact_values
from operators.qc_image import qc_caption, save_qc_png
from operators.seg_writer import add_referenced_series, build_seg, segments_for
from operators.sr_writer import build_volume_sr
from operators.text import printable

__all__ = [
    "MODES",
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
MODES = ("auto", "single", "plus")
# Reference series of a MoME+ group: the finest grid (smallest voxel), ties broken in this order.
PLUS_REFERENCE_ORDER = ("t1ce", "t1", "flair", "t2")


class NothingToSegment(ValueError):
    """No series of the input could be segmented; the message lists why."""


@dataclass
class SeriesTask:
    """One series the router chose, its instances (headers or full datasets) and, once segmented, the results."""

    modality: str
    header: SeriesHeader
    instances: list[Any]
    volume: SeriesVolume | None = None
    segmentation: Any = None  # scripts.pipeline.NativeSegmentation (PlusSegmentation on a MoME+ reference series)
    seconds: dict[str, float] = field(default_factory=dict)
    plus_sources: list[SeriesTask] = field(default_factory=list)  # MoME+ reference: the other contributing series
    plus_reference: str | None = None  # MoME+ contributor: SeriesInstanceUID of the reference series
    in_plus_group: bool = False
    alternatives: list[SeriesTask] = field(default_factory=list)  # next candidates of this modality, preferred first


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
    modality was not requested, or another series of that modality is preferred). Without ``all_series`` each task
    keeps the other series of its modality, preferred first, as ``alternatives``: when the chosen series fails its
    checks, :func:`segment_study` falls back to the next one.
    """
    routed, by_uid = [], {}
    for series_uid, instances in sorted(series.items()):
        # one Enhanced (multi-frame) instance counts its frames
        header = SeriesHeader.from_dataset(instances[0], n_instances=len(instances) if len(instances) > 1 else None)
        routed.append((header, classify(header, rules)))
        by_uid[series_uid] = instances
    ranked = choose(routed, modalities, all_series=True)
    chosen = {modality: headers if all_series else headers[:1] for modality, headers in ranked.items()}
    selected = {header.series_uid for headers in chosen.values() for header in headers}
    decisions = []
    for header, decision in routed:
        record = {**decision.to_dict(), "instances": len(by_uid[header.series_uid])}
        record["description"] = printable(record["description"])
        record["selected"] = header.series_uid in selected
        if decision.modality and not record["selected"]:
            requested = decision.modality in modalities
            record["not_selected"] = "another series preferred" if requested else "modality not requested"
        decisions.append(record)
    tasks = []
    for modality, headers in sorted(chosen.items()):
        for header in headers:
            task = SeriesTask(modality, header, list(by_uid[header.series_uid]))
            if not all_series:
                task.alternatives = [SeriesTask(modality, h, list(by_uid[h.series_uid])) for h in ranked[modality][1:]]
            tasks.append(task)
    return StudyWork(study_uid, decisions, tasks)


def read_pixels(instances: Sequence[Any], name: str, limits: InputLimits | None = None) -> list[Any]:
    """Full datasets: instances read without pixel data (``stop_before_pixels``) are read again from their file.

    The series' declared matrix, slices and voxels are checked against ``limits`` (default
    :meth:`InputLimits.from_env`) first, so no pixel data is read or decoded for a series over a limit.

    Raises:
        SeriesLimitExceeded: the series is over a limit (a :class:`SeriesRejected`).
        SeriesRejected: an instance has no pixel data, no valid Rows/Columns, or its file cannot be read (named by
            SOPInstanceUID).
    """
    check_series(instances, name, limits or InputLimits.from_env())
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


def _segment_task(task: SeriesTask, segmenter: Any, say: Progress, limits: InputLimits) -> None:
    name = f"series {task.header.series_uid}"
    started = time.perf_counter()
    task.volume = series_to_volume(read_pixels(task.instances, name, limits))
    task.seconds["dicom_load"] = time.perf_counter() - started
    task.segmentation = segmenter.segment(
        task.volume.array, task.volume.affine, name=name, modality=task.modality, progress=say
    )
    task.seconds.update(task.segmentation.seconds)


def segment_study(
    work: StudyWork,
    segmenter: Any,
    say: Progress | None = None,
    plus_segmenter: Any = None,
    mode: str = "auto",
    limits: InputLimits | None = None,
) -> StudyWork:
    """Runs MoME on every chosen series (and MoME+ on a group of them, see the module docstring); a series that
    cannot become a volume, or is over one of the ``limits`` (default :meth:`InputLimits.from_env`), is recorded as
    rejected.

    ``segmenter`` may be ``None`` when the bundle holds only a MoME+ model: series MoME+ cannot take are then
    recorded as not segmented, with that reason.
    """
    say = say or (lambda _: None)
    limits = limits or InputLimits.from_env()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    work.model = (segmenter or plus_segmenter).describe()
    group = _plus_group(work.tasks, plus_segmenter, mode if segmenter is not None else "plus")
    for task in work.tasks:
        if task.in_plus_group:
            continue
        name = f"series {task.header.series_uid}"
        if segmenter is None:
            reason = f"{name}: the bundle has no single-modality MoME model for {task.modality}"
            work.entries[task.header.series_uid] = {"modality": task.modality, "rejected": reason}
            continue
        done = _segment_with_fallback(work, task, segmenter, say, limits)
        if done is not None and done is not task:
            work.tasks[work.tasks.index(task)] = done
    if group:
        work.model["mome_plus"] = plus_segmenter.describe()
        _segment_plus(work, group, plus_segmenter, say, limits)
    return work


def _rejections() -> tuple[type[Exception], ...]:
    """The errors that reject one series: its DICOM checks and the segmenter's (a volume or registration that fails
    its checks, :class:`scripts.registration.VolumeRejected`)."""
    try:
        from scripts.registration import VolumeRejected
    except ImportError:  # the bundle's scripts are not importable: only segmenters of the caller's own run
        return (SeriesRejected,)
    return (SeriesRejected, VolumeRejected)


def _reject(work: StudyWork, task: SeriesTask, error: Exception, say: Progress, fallback: SeriesTask | None) -> None:
    """Records why ``task``'s series was not segmented (and which series of its modality is tried instead)."""
    say(f"series {task.header.series_uid} rejected: {printable(error, None)}")
    entry: dict[str, Any] = {"modality": task.modality, "rejected": printable(error, None)}
    if fallback is not None:
        entry["fallback_series"] = fallback.header.series_uid
        say(f"falling back to series {fallback.header.series_uid} for {task.modality}")
        for decision in work.decisions:
            if decision["series_uid"] == fallback.header.series_uid:
                decision.update(selected=True, fallback_for=task.header.series_uid)
                decision.pop("not_selected", None)
    work.entries[task.header.series_uid] = entry


def _segment_with_fallback(
    work: StudyWork, task: SeriesTask, segmenter: Any, say: Progress, limits: InputLimits
) -> SeriesTask | None:
    """Segments ``task``'s series or, when it fails its checks, the next of its ``alternatives``; returns the task
    that was segmented (None: every candidate was rejected, each with its reason in ``work.entries``)."""
    candidates = [task, *task.alternatives]
    for index, candidate in enumerate(candidates):
        say(f"study {work.study_uid}: {candidate.modality} series {candidate.header.series_uid}")
        try:
            _segment_task(candidate, segmenter, say, limits)
            return candidate
        except _rejections() as error:
            fallback = candidates[index + 1] if index + 1 < len(candidates) else None
            _reject(work, candidate, error, say, fallback)
    return None


def _plus_group(tasks: Sequence[SeriesTask], plus_segmenter: Any, mode: str) -> dict[str, SeriesTask]:
    """The first chosen series of each MoME+ modality, when MoME+ runs for this study (marks them)."""
    if plus_segmenter is None or mode == "single":
        return {}
    group: dict[str, SeriesTask] = {}
    for task in tasks:
        if task.modality in plus_segmenter.modalities and task.modality not in group:
            group[task.modality] = task
    if len(group) < (1 if mode == "plus" else 2):
        return {}
    for task in group.values():
        task.in_plus_group = True
    return group


def _load_plus_channel(
    work: StudyWork, candidates: list[SeriesTask], say: Progress, limits: InputLimits
) -> SeriesTask | None:
    """Loads and checks the first of ``candidates`` (one modality, preferred first) that passes; rejected ones are
    recorded and removed from the list, the loaded one too. None: no candidate is left."""
    from scripts.registration import validate_volume

    while candidates:
        task = candidates.pop(0)
        name = f"series {task.header.series_uid}"
        started = time.perf_counter()
        try:
            task.volume = series_to_volume(read_pixels(task.instances, name, limits))
            validate_volume(task.volume.array, task.volume.affine, name)
        except _rejections() as error:
            _reject(work, task, error, say, candidates[0] if candidates else None)
            continue
        task.seconds["dicom_load"] = time.perf_counter() - started
        task.in_plus_group = True
        return task
    return None


def _segment_plus(
    work: StudyWork, group: dict[str, SeriesTask], plus_segmenter: Any, say: Progress, limits: InputLimits
) -> None:
    """MoME+ on the group; a series that fails its checks falls back to the next of its modality, and a reference
    series whose registration fails is rejected and the group is segmented again without it."""
    remaining = {modality: [task, *task.alternatives] for modality, task in group.items()}
    loaded: dict[str, SeriesTask] = {}
    for modality, candidates in remaining.items():
        _add_plus_channel(work, loaded, modality, _load_plus_channel(work, candidates, say, limits), group)
    while loaded:
        reference = min(loaded, key=lambda m: (_voxel_ml(loaded[m].volume), PLUS_REFERENCE_ORDER.index(m)))
        say(f"study {work.study_uid}: MoME+ on {', '.join(loaded)} (reference {reference})")
        try:
            _run_plus(work, loaded, reference, plus_segmenter, say)
            return
        except _rejections() as error:
            failed = loaded.pop(reference)
            replacement = remaining[reference][0] if remaining[reference] else None
            _reject(work, failed, error, say, replacement)
            _add_plus_channel(
                work, loaded, reference, _load_plus_channel(work, remaining[reference], say, limits), group
            )


def _add_plus_channel(
    work: StudyWork,
    loaded: dict[str, SeriesTask],
    modality: str,
    task: SeriesTask | None,
    group: dict[str, SeriesTask],
) -> None:
    """Puts a loaded MoME+ channel in place of its modality's original task (``work.tasks`` lists what was run)."""
    if task is None:
        return
    original = group[modality]
    if task is not original and original in work.tasks:
        work.tasks[work.tasks.index(original)] = task
    elif task is not original:
        work.tasks.append(task)
    loaded[modality] = task


def _run_plus(
    work: StudyWork, loaded: dict[str, SeriesTask], reference: str, plus_segmenter: Any, say: Progress
) -> None:
    """One MoME+ run on the loaded channels; records every contributing series (raises the segmenter's rejection)."""
    from scripts.pipeline import PlusChannel

    channels = {
        m: PlusChannel(t.volume.array, t.volume.affine, _frame_of_reference(t.volume), f"series {t.header.series_uid}")
        for m, t in loaded.items()
    }
    ref_task = loaded[reference]
    ref_task.segmentation = plus_segmenter.segment_channels(channels, reference, say)
    ref_task.seconds.update(ref_task.segmentation.seconds)
    ref_task.plus_sources = [t for m, t in loaded.items() if m != reference]
    excluded = getattr(ref_task.segmentation, "excluded", {}) or {}
    for task in ref_task.plus_sources:
        task.plus_reference = ref_task.header.series_uid
        key = "excluded_from_mome_plus" if task.modality in excluded else "used_in_mome_plus"
        work.entries[task.header.series_uid] = {
            "modality": task.modality,
            key: ref_task.header.series_uid,
            "coregistration": ref_task.segmentation.coregistration[task.modality].to_dict(),
        }


def _voxel_ml(volume: SeriesVolume) -> float:
    return abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0


def _frame_of_reference(volume: SeriesVolume) -> str | None:
    value = getattr(volume.instances[0], "FrameOfReferenceUID", None)
    return str(value) if value else None


def write_segs(work: StudyWork, study_dir: Path) -> StudyWork:
    """One DICOM-SEG per segmented series on its exact source grid, and its volume SR, into ``study_dir``."""
    study_dir.mkdir(parents=True, exist_ok=True)
    name, version = str(work.model.get("name") or "MoME"), str(work.model.get("version") or "unknown")
    for task in work.tasks:
        if task.segmentation is None:
            continue
        started = time.perf_counter()
        if task.plus_sources or getattr(task.segmentation, "availability", None):
            plus = work.model.get("mome_plus", {})
            entry = _write_plus_seg(task, study_dir, str(plus.get("name") or name), str(plus.get("version") or version))
        else:
            entry = _write_single_seg(task, study_dir, name, version)
        task.seconds["seg_write"] = time.perf_counter() - started
        registration = task.segmentation.registration.to_dict()
        work.entries[task.header.series_uid] = {
            "modality": task.modality,
            "series_number": task.header.series_number,
            "description": printable(task.header.description),
            "shape": list(task.volume.array.shape),
            **entry.pop("lesions"),
            "registration": registration,
            "warnings": list(registration["warnings"]) + entry.pop("warnings", []),
            **({"geometry_corrections": list(task.volume.corrections)} if task.volume.corrections else {}),
            "inference": getattr(task.segmentation, "inference", {}),
            **entry,
        }
    return work


def _seg_record(seg: Any, path: Path) -> dict[str, Any]:
    return {
        "file": path.name,
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "series_number": int(seg.SeriesNumber),
        "frames": int(seg.NumberOfFrames),
    }


def _write_single_seg(task: SeriesTask, study_dir: Path, name: str, version: str) -> dict[str, Any]:
    from scripts.metrics import lesion_summary

    seg = build_seg(task.volume, task.segmentation.labels, name, version)
    path = study_dir / f"seg_{task.volume.series_uid}.dcm"
    seg.save_as(path)
    lesions = lesion_summary(task.segmentation.labels, _voxel_ml(task.volume))
    sr = build_volume_sr(seg, task.volume.instances, lesions["lesion_volume_ml"], name, version)
    sr_path = study_dir / f"sr_{task.volume.series_uid}.dcm"
    sr.save_as(sr_path)
    return {
        "lesions": lesions,
        "seg": _seg_record(seg, path),
        "sr": {"file": sr_path.name, "sop_instance_uid": str(sr.SOPInstanceUID)},
    }


def _write_plus_seg(task: SeriesTask, study_dir: Path, name: str, version: str) -> dict[str, Any]:
    """The MoME+ SEG (one segment per class) on the reference series, referencing every contributing series."""
    from scripts.metrics import lesion_summary

    result, labels = task.segmentation, task.segmentation.labels
    segments = segments_for(_channel_def_of(task))
    seg = build_seg(task.volume, labels, name, version, segments=segments)
    used = [source for source in task.plus_sources if source.modality not in (getattr(result, "excluded", {}) or {})]
    add_referenced_series(seg, [source.volume.instances for source in used])
    path = study_dir / f"seg_{task.volume.series_uid}.dcm"
    seg.save_as(path)
    voxel_ml = _voxel_ml(task.volume)
    lesions = lesion_summary(labels > 0, voxel_ml)
    regions = {s.label: round(float((labels == s.value).sum()) * voxel_ml, 3) for s in segments}
    volumes = [(s.value, s.label, regions[s.label]) for s in segments]
    sr = build_volume_sr(seg, task.volume.instances, lesions["lesion_volume_ml"], name, version, volumes)
    sr_path = study_dir / f"sr_{task.volume.series_uid}.dcm"
    sr.save_as(sr_path)
    coregistration = {m: c.to_dict() for m, c in result.coregistration.items()}
    return {
        "lesions": lesions,
        "mode": "mome_plus",
        "modalities_available": [m for m, present in result.availability.items() if present],
        "modalities_missing": [m for m, present in result.availability.items() if not present],
        "modalities_excluded": dict(getattr(result, "excluded", {}) or {}),
        "reference_modality": result.reference,
        "contributing_series": {
            task.modality: task.header.series_uid,
            **{s.modality: s.header.series_uid for s in used},
        },
        "region_volume_ml": regions,
        "coregistration": coregistration,
        "warnings": [f"{m}: {w}" for m, c in coregistration.items() for w in c["warnings"]],
        "seg": {**_seg_record(seg, path), "segments": [s.label for s in segments]},
        "sr": {"file": sr_path.name, "sop_instance_uid": str(sr.SOPInstanceUID)},
    }


def _channel_def_of(task: SeriesTask) -> dict[str, str]:
    """The MoME+ model's classes (label value -> name) recorded on its segmentation."""
    return dict(getattr(task.segmentation, "channel_def", None) or {"0": "background", "1": "lesion"})


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
    return report


def staging_dir(out: Path) -> Path:
    """A hidden, empty folder beside ``out`` (same file system, so :func:`commit` moves are atomic renames)."""
    out = out.resolve()
    missing = missing_folders(out.parent)
    if missing:
        record_path(CREATED, missing[-1])  # the outermost: a stopped run's supervisor removes it
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.mome-", dir=out.parent))
    record_path(STAGING, staging)
    return staging


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
