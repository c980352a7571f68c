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
from dataclasses import dataclass
from typing import Any
from typing import Sequence as SequenceOf

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from .dicom_series import SeriesVolume

__all__ = ["LESION", "SegmentSpec", "build_seg", "seg_series_number"]


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: its label value in the label map, name and SNOMED codes."""

    value: int
    label: str
    category: object = codes.SCT.MorphologicallyAbnormalStructure
    kind: object = codes.SCT.Lesion


LESION = (SegmentSpec(1, "Lesion"),)


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
) -> hd.seg.Segmentation:
    """A binary DICOM-SEG of ``labels`` (same (X, Y, Z) shape as ``volume.array``) referencing every source slice.

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
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=segment.label,
            segmented_property_category=segment.category,
            segmented_property_type=segment.kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
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
        content_description="MoME automatic brain lesion segmentation",
        content_creator_name="MoME^Automatic",
        omit_empty_frames=omit_empty_frames,
    )
    seg.SeriesDescription = f"MoME lesions {model_version} - research use, not for diagnosis"[:64]
    return seg
