"""DICOM-SEG (highdicom) on a source series' exact grid: one frame per source slice, in the sorted instance order.

The label map comes from the native-space pipeline on :class:`operators.dicom_series.SeriesVolume`'s grid, so frame
``k`` is ``labels[:, :, k]`` transposed to (rows, columns) and refers to ``volume.instances[k]`` (single-frame) or to
frame ``volume.frames[k]`` of the one Enhanced MR instance (the SEG's frames then follow the source's frame order);
nothing is resampled.
Empty frames are kept by default (viewers expect one frame per slice). Segments are coded with SNOMED CT; the
algorithm identification, series description and content creator come from the model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Sequence as SequenceOf

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from operators import bundle
from operators.bundle import lesion_summary
from operators.dicom_series import SeriesVolume
from operators.sr_writer import build_volume_sr
from operators.study import SeriesTask, StudyWork
from operators.text import printable

logger = logging.getLogger(__name__)

__all__ = [
    "LESION",
    "SegmentSpec",
    "add_referenced_series",
    "build_seg",
    "seg_series_number",
    "segments_for",
    "write_segs",
]


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: its label value in the label map, name and SNOMED codes."""

    value: int
    label: str
    category: object = codes.SCT.MorphologicallyAbnormalStructure
    kind: object = codes.SCT.Lesion


LESION = (SegmentSpec(1, "Lesion"),)

# Class names a model's channel_def may use -> (segment label, SNOMED CT property type). BraTS sub-regions first.
_KNOWN_CLASSES = {
    ("necrotic_core", "necrosis", "ncr", "necrotic", "ncr/net", "necrotic and non-enhancing tumor core"): (
        "Necrotic tumour core", codes.SCT.Necrosis,
    ),
    ("oedema", "edema", "ed", "peritumoral edema", "peritumoral oedema"): ("Peritumoral oedema", codes.SCT.Edema),
    ("enhancing", "et", "enhancing tumor", "enhancing tumour"): ("Enhancing tumour", codes.SCT.Neoplasm),
    ("lesion", "lesions", "abnormal", "abnormality"): ("Lesion", codes.SCT.Lesion),
}  # fmt: skip


def segments_for(channel_def: Mapping[str, str]) -> tuple[SegmentSpec, ...]:
    """Segment descriptions for a model's ``channel_def`` (label value -> class name; 0 = background skipped).

    Known names (BraTS sub-regions, "lesion") get their SNOMED CT codes; any other class is coded as a lesion and
    keeps its own name as the segment label. Segment numbers follow the label values (1, 2, 3, ...).
    """
    specs = []
    for value, name in sorted(((int(k), str(v)) for k, v in channel_def.items()), key=lambda item: item[0]):
        if value == 0:
            continue
        label, kind = next(
            (known for names, known in _KNOWN_CLASSES.items() if name.strip().lower() in names),
            (name.replace("_", " ")[:64], codes.SCT.Lesion),
        )
        specs.append(SegmentSpec(value, label, kind=kind))
    if [s.value for s in specs] != list(range(1, len(specs) + 1)):
        raise ValueError(f"channel_def {dict(channel_def)} must number its classes 0, 1, 2, ... without gaps.")
    return tuple(specs)


def add_referenced_series(seg: hd.seg.Segmentation, series: SequenceOf[SequenceOf[Any]]) -> None:
    """Also references every instance of further source ``series`` (lists of datasets) in the SEG's
    ReferencedSeriesSequence (Common Instance Reference module): MoME+ segments the reference series from several
    co-registered series of the study, which all contributed to the result."""
    for instances in series:
        item = Dataset()
        item.SeriesInstanceUID = instances[0].SeriesInstanceUID
        references = []
        for ds in instances:
            reference = Dataset()
            reference.ReferencedSOPClassUID = ds.SOPClassUID
            reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            references.append(reference)
        item.ReferencedInstanceSequence = Sequence(references)
        seg.ReferencedSeriesSequence.append(item)


def seg_series_number(source_series_number: int | None) -> int:
    """Deterministic SEG series number: the source's plus 7000 (7000 when the source has none)."""
    return 7000 + int(source_series_number or 0) % 1000


def _highdicom_source(ds: Any) -> Any:
    """An Enhanced source as highdicom can read it: per-frame-only pixel measures / orientation also shared.

    highdicom reads a multi-frame source's pixel measures from the *shared* functional groups only; vendors (Philips)
    often store them per frame. The series check has already verified they are equal for every frame, so a shallow
    copy with frame 1's items in a new shared group is the same geometry. The caller's dataset is not modified.
    """
    if int(getattr(ds, "NumberOfFrames", 1) or 1) <= 1:
        return ds
    shared_groups = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if not shared_groups:
        return ds  # not a valid Enhanced instance; highdicom will say why
    shared = copy.deepcopy(shared_groups[0])
    first_frame = ds.PerFrameFunctionalGroupsSequence[0]
    missing = [k for k in ("PixelMeasuresSequence", "PlaneOrientationSequence") if k not in shared and k in first_frame]
    if not missing:
        return ds
    for keyword in missing:
        setattr(shared, keyword, copy.deepcopy(first_frame[keyword].value))
    # A new element dict sharing the unchanged elements (pixel data included); Dataset(ds) would share ds's dict.
    source = Dataset({tag: ds.get_item(tag) for tag in ds.keys()})
    source.file_meta = ds.file_meta
    del source.SharedFunctionalGroupsSequence  # a new element: assigning would change the shared one in place
    source.SharedFunctionalGroupsSequence = Sequence([shared])
    return source


def build_seg(
    volume: SeriesVolume,
    labels: np.ndarray,
    model_name: str,
    model_version: str,
    segments: SequenceOf[SegmentSpec] = LESION,
    omit_empty_frames: bool = False,
    reviewed_in: str | None = None,
) -> hd.seg.Segmentation:
    """A binary DICOM-SEG of ``labels`` (same (X, Y, Z) shape as ``volume.array``) referencing every source slice;
    one segment per entry of ``segments`` (label value -> segment number, e.g. BraTS sub-regions 1-3).

    ``reviewed_in`` names the tool where a person reviewed or corrected the model's output (e.g. ``MONAI Label``):
    the segments are then SEMIAUTOMATIC and the series and content descriptions say so; otherwise AUTOMATIC.

    Raises:
        ValueError: the label map is not on the source grid, or holds values without a segment.
    """
    if labels.shape != volume.array.shape:
        raise ValueError(f"label map {labels.shape} is not on the source grid {volume.array.shape}; refusing to write.")
    values = {int(v) for v in np.unique(labels)} - {0}
    known = {s.value for s in segments}
    if not values <= known:
        raise ValueError(f"label values {sorted(values - known)} have no segment description.")
    pixel_array = np.zeros((labels.shape[2], labels.shape[1], labels.shape[0], len(segments)), dtype=bool)
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (X, Y, Z) -> (Z, rows, cols), sorted slice order
    if volume.frames is not None:  # Enhanced source: frame i of the SEG is frame i of the source instance
        unsorted = np.empty_like(frames)
        unsorted[volume.frames] = frames
        frames = unsorted
    for index, segment in enumerate(segments):
        pixel_array[..., index] = frames == segment.value
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name, family=codes.DCM.ArtificialIntelligence, version=model_version
    )
    values = hd.seg.SegmentAlgorithmTypeValues
    algorithm_type = values.SEMIAUTOMATIC if reviewed_in else values.AUTOMATIC
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=segment.label,
            segmented_property_category=segment.category,
            segmented_property_type=segment.kind,
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
        )
        for index, segment in enumerate(segments)
    ]
    first = volume.instances[0]
    seg = hd.seg.Segmentation(
        source_images=[_highdicom_source(ds) for ds in volume.instances],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=seg_series_number(getattr(first, "SeriesNumber", None)),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MoME open-source project",
        manufacturer_model_name=model_name[:64],
        software_versions=model_version,
        device_serial_number="0",
        content_label="LESIONS",
        content_description=(
            f"MoME brain lesion segmentation reviewed in {reviewed_in}"
            if reviewed_in
            else "MoME automatic brain lesion segmentation"
        )[:64],
        content_creator_name="MoME^Reviewed" if reviewed_in else "MoME^Automatic",
        omit_empty_frames=omit_empty_frames,
    )
    kind = f"reviewed in {reviewed_in}" if reviewed_in else model_version
    seg.SeriesDescription = f"MoME lesions {kind} - research use, not for diagnosis"[:64]
    return seg


def write_segs(work: StudyWork, study_dir: Path) -> StudyWork:
    """One DICOM-SEG per segmented series on its exact source grid, and its volume SR, into ``study_dir``."""
    study_dir.mkdir(parents=True, exist_ok=True)
    name, version = str(work.model.get("name") or "MoME"), str(work.model.get("version") or "unknown")
    for task in work.tasks:
        if task.segmentation is None:
            continue
        started = time.perf_counter()
        if task.mome_plus:
            plus = work.model.get("mome_plus", {})
            entry = _write_plus_seg(task, study_dir, str(plus.get("name") or name), str(plus.get("version") or version))
        else:
            entry = _write_single_seg(task, study_dir, name, version)
        task.seconds["seg_write"] = time.perf_counter() - started
        logger.info("study %s: SEG and SR written for %s", work.study_uid, task.name)
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
            "inference": task.segmentation.inference,
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
    seg = build_seg(task.volume, task.segmentation.labels, name, version)
    path = study_dir / f"seg_{task.volume.series_uid}.dcm"
    seg.save_as(path)
    lesions = lesion_summary(task.segmentation.labels, task.volume.affine)
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
    result = task.plus_segmentation
    labels = result.labels
    segments = segments_for(_channel_def_of(task))
    seg = build_seg(task.volume, labels, name, version, segments=segments)
    used = [source for source in task.plus_sources if source.modality not in result.excluded]
    add_referenced_series(seg, [source.volume.instances for source in used])
    path = study_dir / f"seg_{task.volume.series_uid}.dcm"
    seg.save_as(path)
    lesions = lesion_summary(labels > 0, task.volume.affine)
    regions = bundle.region_volumes(labels, task.volume.affine, {s.label: s.value for s in segments})
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
        "modalities_excluded": dict(result.excluded),
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
    return dict(task.plus_segmentation.channel_def or {"0": "background", "1": "lesion"})
