"""An MR series -> one 3-D volume on its exact grid, with the geometry checked, not assumed.

Single-frame series (one instance per slice) and Enhanced MR (one multi-frame instance with per-frame functional
groups; the geometry comes from its Plane Position / Plane Orientation / Pixel Measures groups, per frame or shared)
take the same path: each slice (instance or frame) becomes a :class:`SliceRef`.

Instances are sorted by their position along the slice normal (``ImageOrientationPatient`` row x column cosines), in
any orientation (axial, sagittal, coronal, oblique, negated axes) and any file order. The volume is ``(X, Y, Z)`` =
(columns, rows, sorted slices) with a RAS affine (nibabel / MONAI convention), so the native-space pipeline can run on
it, and ``SeriesVolume.instances`` keeps the sorted datasets: a label map on this grid maps back to source instance
``instances[k]`` as slice ``k``, which is what the DICOM-SEG writer needs.

Geometry is checked strictly, because a label map on a misread grid lands in the wrong place. Rejected with
:class:`SeriesRejected` (the message names the series and the check): missing, non-finite or malformed
``ImageOrientationPatient`` / ``ImagePositionPatient`` / ``PixelSpacing``; orientation vectors that are not unit length
(beyond ``UNIT_LENGTH_CORRECTION``) or not orthogonal (``ORTHOGONALITY_TOLERANCE``); mixed orientations or matrix
sizes; duplicate ``SOPInstanceUID``s or slice positions; irregular spacing (missing slices); slices not stacked along
the normal (gantry tilt beyond ``TILT_TOLERANCE_DEGREES``, or shear); fewer than ``MIN_SLICES`` slices; a zero or
non-finite ``RescaleSlope`` or non-finite ``RescaleIntercept``; colour images. One correction is standard and applied:
orientation vectors whose length is off by more than ``UNIT_LENGTH_TOLERANCE`` but at most ``UNIT_LENGTH_CORRECTION``
are normalised, and ``SeriesVolume.corrections`` says so (the report carries it).

Intensities: the stored values are rescaled in float64 (slope and intercept per instance or frame) and the series'
minimum is subtracted before the float32 volume is made, so 32-bit data with offsets of 2**31 keep their precision.
The offset carries no meaning for MR; the segmentation pipeline normalises intensities anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence

import numpy as np

from operators.text import printable

__all__ = [
    "MIN_SLICES",
    "ORTHOGONALITY_TOLERANCE",
    "SeriesRejected",
    "SeriesVolume",
    "SliceRef",
    "TILT_TOLERANCE_DEGREES",
    "UNIT_LENGTH_CORRECTION",
    "UNIT_LENGTH_TOLERANCE",
    "series_to_volume",
    "sort_instances",
]

MIN_SLICES = 8
ORIENTATION_TOLERANCE = 1e-3  # largest difference between the instances' ImageOrientationPatient values
UNIT_LENGTH_TOLERANCE = 1e-3  # |length - 1| of an orientation vector accepted as rounding (normalised silently)
UNIT_LENGTH_CORRECTION = 0.01  # up to this |length - 1| the vector is normalised and the correction reported
ORTHOGONALITY_TOLERANCE = 1e-3  # largest |cos| of the angle between the row and column vectors
TILT_TOLERANCE_DEGREES = 0.5  # largest angle between the slice step and the slice normal
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
    corrections: List[str] = field(default_factory=list)  # standard corrections applied to the header geometry


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

    def stored(self) -> np.ndarray:
        """The slice's stored values (rows, columns), not rescaled."""
        data = self.dataset.pixel_array if self.frame is None else self.dataset.pixel_array[self.frame]
        if data.ndim != 2:
            raise ValueError(f"expected one grey-scale plane per slice, got pixel array shape {data.shape}")
        return data

    def pixels(self) -> np.ndarray:
        """The slice's rescaled values (rows, columns) in float64."""
        return self.stored().astype(np.float64) * self.slope + self.intercept


def _name(datasets: Sequence[Any]) -> str:
    first = datasets[0]
    description = printable(str(getattr(first, "SeriesDescription", "") or ""))
    return f"series {printable(str(getattr(first, 'SeriesInstanceUID', '?')))}" + (
        f" ({description})" if description else ""
    )


def _numbers(value: Any, count: int) -> np.ndarray:
    numbers = np.array([float(v) for v in value], dtype=float)
    if numbers.shape != (count,):
        raise ValueError(f"{len(numbers)} values instead of {count}")
    return numbers


def _geometry(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit orientation vectors, position, pixel spacing) of one slice, checked; see the module docstring."""
    try:
        orientation = _numbers(ds.ImageOrientationPatient, 6)
        position = _numbers(ds.ImagePositionPatient, 3)
        spacing = _numbers(ds.PixelSpacing, 2)
    except (AttributeError, TypeError, ValueError) as error:
        raise SeriesRejected(
            f"{name}: an instance lacks or has malformed ImageOrientationPatient, ImagePositionPatient or PixelSpacing "
            f"({error})."
        ) from error
    for keyword, values in (("ImageOrientationPatient", orientation), ("ImagePositionPatient", position)):
        if not np.isfinite(values).all():
            raise SeriesRejected(f"{name}: {keyword} holds a non-finite value (NaN or infinity).")
    if not np.isfinite(spacing).all() or (spacing <= 0).any():
        raise SeriesRejected(f"{name}: PixelSpacing {spacing.tolist()} is not positive and finite.")
    return _unit_orientation(orientation, name), position, spacing


def _orientation_lengths(orientation: np.ndarray) -> np.ndarray:
    return np.linalg.norm(orientation.reshape(2, 3), axis=1)


def _unit_orientation(orientation: np.ndarray, name: str) -> np.ndarray:
    """Row and column direction cosines normalised, or SeriesRejected when they are far from unit or orthogonal."""
    lengths = _orientation_lengths(orientation)
    if np.abs(lengths - 1.0).max() > UNIT_LENGTH_CORRECTION:
        raise SeriesRejected(
            f"{name}: ImageOrientationPatient vectors are not unit length (row {lengths[0]:.4f}, column "
            f"{lengths[1]:.4f}; tolerance {UNIT_LENGTH_CORRECTION}): the pixel spacing cannot be trusted."
        )
    row, column = orientation.reshape(2, 3) / lengths[:, None]
    cosine = float(abs(row @ column))
    if cosine > ORTHOGONALITY_TOLERANCE:
        angle = float(np.degrees(np.arccos(min(cosine, 1.0))))
        raise SeriesRejected(
            f"{name}: ImageOrientationPatient row and column vectors are not orthogonal ({angle:.2f} degrees apart; "
            f"|cos| {cosine:.4f} > {ORTHOGONALITY_TOLERANCE})."
        )
    return np.concatenate([row, column])


def _orientation_corrections(ref: SliceRef) -> List[str]:
    """The normalisation of the orientation vectors, when it was more than rounding."""
    lengths = _orientation_lengths(_numbers(ref.ImageOrientationPatient, 6))
    if np.abs(lengths - 1.0).max() <= UNIT_LENGTH_TOLERANCE:
        return []
    return [
        f"ImageOrientationPatient normalised to unit length (row {lengths[0]:.4f}, column {lengths[1]:.4f}; "
        f"accepted up to {UNIT_LENGTH_CORRECTION} off)"
    ]


def _rescale(source: Any, name: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of an instance or frame: missing is (1, 0); zero or non-finite is rejected."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = getattr(source, keyword, None)
        try:
            value = default if raw is None or raw == "" else float(raw)
        except (TypeError, ValueError) as error:
            raise SeriesRejected(f"{name}: {keyword} {printable(str(raw))!r} is not a number.") from error
        if not np.isfinite(value):
            raise SeriesRejected(f"{name}: {keyword} is not finite.")
        values.append(value)
    if values[0] == 0.0:
        raise SeriesRejected(f"{name}: RescaleSlope is 0 (every pixel would have the same value).")
    return values[0], values[1]


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
        slope, intercept = _rescale(transform if transform is not None else ds, f"{name}, frame {index + 1}")
        refs.append(
            SliceRef(
                orientation.ImageOrientationPatient, position.ImagePositionPatient, measures.PixelSpacing,
                int(ds.Rows), int(ds.Columns), str(getattr(ds, "SeriesInstanceUID", "")),
                str(getattr(ds, "SeriesDescription", "") or ""), ds, index,
                slope, intercept,
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
            *_rescale(ds, f"{_name(datasets)}, instance {printable(getattr(ds, 'SOPInstanceUID', '?'))}"),
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
    tilt = float(np.degrees(np.arccos(np.clip(step @ normal / np.linalg.norm(step), -1.0, 1.0))))
    if tilt > TILT_TOLERANCE_DEGREES:
        raise SeriesRejected(
            f"{name}: slices are not stacked along their normal (gantry tilt or shear of {tilt:.2f} degrees > "
            f"{TILT_TOLERANCE_DEGREES})."
        )
    expected = positions[0] + np.outer(np.arange(len(instances)), step)
    if np.abs(expected - positions).max() > max(SHEAR_TOLERANCE_MM, 0.01 * median):
        raise SeriesRejected(f"{name}: slices are not evenly stacked (gantry tilt or sheared acquisition).")
    return orientation, spacing, step


def _check_unique_instances(datasets: Sequence[Any]) -> None:
    """Every single-frame instance has its own SOPInstanceUID (a SEG frame references its source by it)."""
    seen: dict[str, int] = {}
    for ds in datasets:
        uid = str(getattr(ds, "SOPInstanceUID", "") or "")
        if not uid:
            raise SeriesRejected(f"{_name(datasets)}: an instance has no SOPInstanceUID.")
        seen[uid] = seen.get(uid, 0) + 1
    duplicated = sorted(uid for uid, count in seen.items() if count > 1)
    if duplicated:
        raise SeriesRejected(
            f"{_name(datasets)}: {len(duplicated)} SOPInstanceUID(s) occur more than once (e.g. "
            f"{printable(duplicated[0])}): duplicated files or a broken export."
        )


def _stack_pixels(slices: Sequence[SliceRef], name: str) -> np.ndarray:
    """(X, Y, Z) float32 volume: each slice rescaled in float64, the series minimum subtracted, then cast."""
    try:
        stored = [ref.stored() for ref in slices]
    except Exception as error:  # pydicom raises several types for undecodable pixel data
        raise SeriesRejected(f"{name}: pixel data cannot be decoded ({printable(error)}).") from error
    lowest = min(
        float(min(plane.min() * ref.slope, plane.max() * ref.slope)) + ref.intercept
        for plane, ref in zip(stored, slices)
    )
    rows, columns = stored[0].shape
    array = np.empty((columns, rows, len(slices)), dtype=np.float32)
    for k, (plane, ref) in enumerate(zip(stored, slices)):
        array[:, :, k] = (plane.astype(np.float64) * ref.slope + (ref.intercept - lowest)).T
    return array


def series_to_volume(datasets: Sequence[Any]) -> SeriesVolume:
    """Sorts, checks and stacks the slices of a series (instances with pixel data) into a :class:`SeriesVolume`."""
    if not datasets:
        raise SeriesRejected("empty series.")
    refs = _slice_refs(datasets)
    if refs[0].frame is None:
        _check_unique_instances(datasets)
    slices = sort_instances(refs)
    name = _name(slices)
    orientation, spacing, step = _check_stack(slices, name)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]  # along columns index (x): row direction cosine x column spacing
    lps[:3, 1] = orientation[3:] * spacing[0]  # along rows index (y)
    lps[:3, 2] = step
    lps[:3, 3] = _geometry(slices[0], name)[1]
    array = _stack_pixels(slices, name)
    multi_frame = slices[0].frame is not None
    instances = [slices[0].dataset] if multi_frame else [ref.dataset for ref in slices]
    frames = [ref.frame for ref in slices] if multi_frame else None
    corrections = _orientation_corrections(slices[0])
    return SeriesVolume(array, LPS_TO_RAS @ lps, instances, slices[0].SeriesInstanceUID, frames, corrections)
