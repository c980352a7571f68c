"""A single-frame MR series -> one 3-D volume on its exact grid, with the geometry checked, not assumed.

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

__all__ = ["MIN_SLICES", "SeriesRejected", "SeriesVolume", "series_to_volume", "sort_instances"]

MIN_SLICES = 8
ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 0.05  # relative deviation of slice gaps from their median
SHEAR_TOLERANCE_MM = 0.05
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SeriesRejected(ValueError):
    """A series that cannot become a volume; the message names it and says why."""


@dataclass
class SeriesVolume:
    """Voxel data, RAS affine and the slice-sorted source instances of one series."""

    array: np.ndarray  # (X, Y, Z) = (columns, rows, slices), float32, rescaled
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    instances: List[Any]  # source datasets, instances[k] is slice k
    series_uid: str


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
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in instances):
        raise SeriesRejected(f"{name}: multi-frame (Enhanced) instances are not supported by the single-frame path.")
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
    """Sorts, checks and stacks single-frame instances (with pixel data) into a :class:`SeriesVolume`."""
    instances = sort_instances(datasets)
    name = _name(instances)
    orientation, spacing, step = _check_stack(instances, name)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]  # along columns index (x): row direction cosine x column spacing
    lps[:3, 1] = orientation[3:] * spacing[0]  # along rows index (y)
    lps[:3, 2] = step
    lps[:3, 3] = _geometry(instances[0], name)[1]
    try:
        slices = [
            ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1)
            + float(getattr(ds, "RescaleIntercept", 0) or 0)
            for ds in instances
        ]
    except Exception as error:  # pydicom raises several types for undecodable pixel data
        raise SeriesRejected(f"{name}: pixel data cannot be decoded ({error}).") from error
    array = np.ascontiguousarray(np.stack(slices).transpose(2, 1, 0))  # (Z, rows, cols) -> (cols, rows, Z)
    return SeriesVolume(array, LPS_TO_RAS @ lps, list(instances), str(getattr(instances[0], "SeriesInstanceUID", "")))
