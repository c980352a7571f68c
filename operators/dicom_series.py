"""An MR series -> one 3-D volume on its exact grid, with the geometry checked, not assumed.

Single-frame series (one instance per slice) and Enhanced MR (one multi-frame instance with per-frame functional
groups; the geometry comes from its Plane Position / Plane Orientation / Pixel Measures groups, per frame or shared)
take the same path: each slice (instance or frame) becomes a :class:`SliceRef`.

Instances are sorted by their position along the slice normal (``ImageOrientationPatient`` row x column cosines), in
any orientation (axial, sagittal, coronal, oblique, negated axes) and any file order. The volume is ``(X, Y, Z)`` =
(columns, rows, sorted slices) with a RAS affine (nibabel / MONAI convention), so the native-space pipeline can run on
it, and ``SeriesVolume.instances`` keeps the sorted datasets: a label map on this grid maps back to source instance
``instances[k]`` as slice ``k``, which is what the DICOM-SEG writer needs.

Rejected with :class:`SeriesRejected` (the message names the series and the reason): missing geometry, mixed
orientations or matrix sizes, duplicate slice positions, irregular spacing (missing slices), slices not stacked along
the normal (gantry tilt / shear), fewer than ``MIN_SLICES`` slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import numpy as np

__all__ = ["MIN_SLICES", "SeriesRejected", "SeriesVolume", "SliceRef", "series_to_volume", "sort_instances"]

MIN_SLICES = 8
ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 0.05  # relative deviation of slice gaps from their median
SHEAR_TOLERANCE_MM = 0.05
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SeriesRejected(ValueError):
    """A series that cannot become a volume; the message names it and says why."""


@dataclass
class SeriesVolume:
    """Voxel data, RAS affine and the slice-sorted sources of one series.

    Single-frame: ``instances[k]`` is slice ``k`` and ``frames`` is None. Enhanced (multi-frame): ``instances`` holds
    the one source instance and slice ``k`` is its frame ``frames[k]`` (0-based).
    """

    array: np.ndarray  # (X, Y, Z) = (columns, rows, slices), float32, rescaled
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    instances: List[Any]  # source datasets
    series_uid: str
    frames: List[int] | None = None


@dataclass
class SliceRef:
    """One slice of a series: the geometry attributes the checks read, and where its pixels are."""

    ImageOrientationPatient: Any
    ImagePositionPatient: Any
    PixelSpacing: Any
    Rows: int
    Columns: int
    SeriesInstanceUID: str
    SeriesDescription: str
    dataset: Any
    frame: int | None = None  # 0-based frame of a multi-frame dataset
    slope: float = 1.0
    intercept: float = 0.0

    def pixels(self) -> np.ndarray:
        data = self.dataset.pixel_array if self.frame is None else self.dataset.pixel_array[self.frame]
        return data.astype(np.float32) * self.slope + self.intercept


def _name(datasets: Sequence[Any]) -> str:
    first = datasets[0]
    description = str(getattr(first, "SeriesDescription", "") or "")
    return f"series {getattr(first, 'SeriesInstanceUID', '?')}" + (f" ({description})" if description else "")


def _geometry(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        spacing = np.array([float(v) for v in ds.PixelSpacing])
    except (AttributeError, TypeError, ValueError) as error:
        raise SeriesRejected(f"{name}: an instance lacks ImageOrientationPatient/Position or PixelSpacing.") from error
    if orientation.shape != (6,) or position.shape != (3,) or spacing.shape != (2,) or (spacing <= 0).any():
        raise SeriesRejected(f"{name}: malformed ImageOrientationPatient, ImagePositionPatient or PixelSpacing.")
    return orientation, position, spacing


def _group(ds: Any, index: int, sequence: str) -> Any:
    """Item of a functional group for frame ``index``: per-frame first, then shared; None when absent."""
    for groups in (
        getattr(ds, "PerFrameFunctionalGroupsSequence", None),
        getattr(ds, "SharedFunctionalGroupsSequence", None),
    ):
        if not groups:
            continue
        group = groups[index] if groups is getattr(ds, "PerFrameFunctionalGroupsSequence", None) else groups[0]
        if sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def _frame_refs(ds: Any) -> List[SliceRef]:
    """The frames of an Enhanced (multi-frame) instance as slices, geometry from its functional groups."""
    name = _name([ds])
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if len(getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []) != frames:
        raise SeriesRejected(f"{name}: multi-frame instance without one per-frame functional group per frame.")
    refs = []
    for index in range(frames):
        position, orientation = (
            _group(ds, index, "PlanePositionSequence"),
            _group(ds, index, "PlaneOrientationSequence"),
        )
        measures, transform = (
            _group(ds, index, "PixelMeasuresSequence"),
            _group(ds, index, "PixelValueTransformationSequence"),
        )
        if position is None or orientation is None or measures is None:
            raise SeriesRejected(f"{name}: frame {index + 1} lacks plane position, orientation or pixel measures.")
        scaling = transform if transform is not None else ds
        refs.append(
            SliceRef(
                orientation.ImageOrientationPatient, position.ImagePositionPatient, measures.PixelSpacing,
                int(ds.Rows), int(ds.Columns), str(getattr(ds, "SeriesInstanceUID", "")),
                str(getattr(ds, "SeriesDescription", "") or ""), ds, index,
                float(getattr(scaling, "RescaleSlope", 1) or 1), float(getattr(scaling, "RescaleIntercept", 0) or 0),
            )
        )  # fmt: skip
    return refs


def _slice_refs(datasets: Sequence[Any]) -> List[SliceRef]:
    """Every slice of a series: the frames of one Enhanced instance, or one slice per single-frame instance."""
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        if len(datasets) != 1:
            raise SeriesRejected(f"{_name(datasets)}: several multi-frame instances in one series (4-D or mixed).")
        return _frame_refs(datasets[0])
    return [
        SliceRef(
            getattr(ds, "ImageOrientationPatient", None), getattr(ds, "ImagePositionPatient", None),
            getattr(ds, "PixelSpacing", None), getattr(ds, "Rows", 0), getattr(ds, "Columns", 0),
            str(getattr(ds, "SeriesInstanceUID", "")), str(getattr(ds, "SeriesDescription", "") or ""), ds, None,
            float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0),
        )
        for ds in datasets
    ]  # fmt: skip


def sort_instances(datasets: Sequence[Any]) -> List[Any]:
    """Single-frame instances sorted by position along the slice normal (ascending)."""
    if not datasets:
        raise SeriesRejected("empty series.")
    name = _name(datasets)
    orientation, _, _ = _geometry(datasets[0], name)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, _geometry(ds, name)[1])))


def _check_stack(instances: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common orientation, pixel spacing, matrix and a regular stack; returns (orientation, spacing, slice step)."""
    if len(instances) < MIN_SLICES:
        raise SeriesRejected(f"{name}: {len(instances)} slices; at least {MIN_SLICES} are needed for a 3-D volume.")
    geometry = [_geometry(ds, name) for ds in instances]
    orientation, _, spacing = geometry[0]
    for ds, (other_orientation, _, other_spacing) in zip(instances, geometry):
        if np.abs(other_orientation - orientation).max() > ORIENTATION_TOLERANCE:
            raise SeriesRejected(f"{name}: instances have different orientations (a localizer or MPR mix).")
        if np.abs(other_spacing - spacing).max() > 1e-4 or (ds.Rows, ds.Columns) != (
            instances[0].Rows,
            instances[0].Columns,
        ):
            raise SeriesRejected(f"{name}: instances have different matrix sizes or pixel spacings.")
    positions = np.array([g[1] for g in geometry])
    steps = np.diff(positions, axis=0)
    normal = np.cross(orientation[:3], orientation[3:])
    gaps = steps @ normal
    if (gaps < 1e-3).any():
        raise SeriesRejected(f"{name}: duplicate slice positions (several acquisitions or echoes in one series).")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        raise SeriesRejected(
            f"{name}: irregular slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm; missing slices?)."
        )
    step = (positions[-1] - positions[0]) / (len(instances) - 1)
    expected = positions[0] + np.outer(np.arange(len(instances)), step)
    if np.abs(expected - positions).max() > max(SHEAR_TOLERANCE_MM, 0.01 * median):
        raise SeriesRejected(f"{name}: slices are not evenly stacked (gantry tilt or sheared acquisition).")
    return orientation, spacing, step


def series_to_volume(datasets: Sequence[Any]) -> SeriesVolume:
    """Sorts, checks and stacks the slices of a series (instances with pixel data) into a :class:`SeriesVolume`."""
    if not datasets:
        raise SeriesRejected("empty series.")
    slices = sort_instances(_slice_refs(datasets))
    name = _name(slices)
    orientation, spacing, step = _check_stack(slices, name)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]  # along columns index (x): row direction cosine x column spacing
    lps[:3, 1] = orientation[3:] * spacing[0]  # along rows index (y)
    lps[:3, 2] = step
    lps[:3, 3] = _geometry(slices[0], name)[1]
    try:
        stack = [ref.pixels() for ref in slices]
    except Exception as error:  # pydicom raises several types for undecodable pixel data
        raise SeriesRejected(f"{name}: pixel data cannot be decoded ({error}).") from error
    array = np.ascontiguousarray(np.stack(stack).transpose(2, 1, 0))  # (Z, rows, cols) -> (cols, rows, Z)
    multi_frame = slices[0].frame is not None
    instances = [slices[0].dataset] if multi_frame else [ref.dataset for ref in slices]
    frames = [ref.frame for ref in slices] if multi_frame else None
    return SeriesVolume(array, LPS_TO_RAS @ lps, instances, slices[0].SeriesInstanceUID, frames)
