"""Strict series checks (issue 32): header geometry and pixel scaling that 0.9.1 accepted and misread.

Each check is tested on both sides of its tolerance: a value just inside is accepted (and, for the one standard
correction, normalising ImageOrientationPatient, reported), a value outside is rejected naming the series and the
check. A misread grid puts lesions in the wrong place (0.9.1 found 38 mL of "lesions" in the orbits of a series
whose orientation vectors were half a unit long), so nothing here is guessed.
"""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import make_series

from operators.dicom_series import (
    ORTHOGONALITY_TOLERANCE,
    TILT_TOLERANCE_DEGREES,
    UNIT_LENGTH_CORRECTION,
    UNIT_LENGTH_TOLERANCE,
    SeriesRejected,
    series_to_volume,
)

SHAPE = (20, 18, 10)  # (columns, rows, slices)
AFFINE = np.diag([1.2, 1.2, 4.0, 1.0])


def _series(affine: np.ndarray = AFFINE, volume: np.ndarray | None = None):
    volume = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 3000 if volume is None else volume
    return make_series(volume, affine, description="AX T2")


def _rejected(datasets, check: str) -> None:
    uid = datasets[0].SeriesInstanceUID
    with pytest.raises(SeriesRejected, match=f"series {uid} \\(AX T2\\).*{check}"):
        series_to_volume(datasets)


def _scaled_orientation(datasets, row_length: float) -> None:
    for ds in datasets:
        row = np.array(ds.ImageOrientationPatient[:3], float) * row_length
        ds.ImageOrientationPatient = [*row.tolist(), *ds.ImageOrientationPatient[3:]]


def test_orientation_vectors_far_from_unit_length_are_rejected():
    datasets = _series()
    _scaled_orientation(datasets, 0.5)  # 0.9.1 read this as a different pixel size
    _rejected(datasets, "not unit length")
    datasets = _series()
    _scaled_orientation(datasets, 1.0 + UNIT_LENGTH_CORRECTION * 1.5)
    _rejected(datasets, "not unit length")


def test_orientation_vectors_slightly_off_unit_length_are_normalised_and_reported():
    plain = series_to_volume(_series())
    assert plain.corrections == []
    rounding = _series()
    _scaled_orientation(rounding, 1.0 + UNIT_LENGTH_TOLERANCE / 2)
    assert series_to_volume(rounding).corrections == []
    datasets = _series()
    _scaled_orientation(datasets, 1.0 + UNIT_LENGTH_CORRECTION / 2)
    volume = series_to_volume(datasets)
    np.testing.assert_allclose(volume.affine, plain.affine, atol=1e-6)  # the pixel spacing is unchanged
    (correction,) = volume.corrections
    assert "normalised to unit length" in correction and "1.0050" in correction


def _column_at(cosine: float, datasets) -> None:
    """Column vector in the axial plane at ``arccos(cosine)`` from the row vector (slices stay along z)."""
    for ds in datasets:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, cosine, float(np.sqrt(1.0 - cosine**2)), 0.0]


def test_non_orthogonal_orientation_vectors_are_rejected():
    datasets = _series()
    _column_at(np.cos(np.deg2rad(60.0)), datasets)  # row and column 60 degrees apart, accepted by 0.9.1
    _rejected(datasets, "not orthogonal .*60.00 degrees apart")
    datasets = _series()
    _column_at(ORTHOGONALITY_TOLERANCE / 2, datasets)
    series_to_volume(datasets)  # within tolerance: accepted
    datasets = _series()
    _column_at(ORTHOGONALITY_TOLERANCE * 2, datasets)
    _rejected(datasets, "not orthogonal")


def _tilted(degrees: float):
    affine = AFFINE.copy()
    affine[1, 2] = affine[2, 2] * np.tan(np.deg2rad(degrees))  # each slice shifted along the column direction
    return _series(affine)


def test_a_uniform_gantry_tilt_is_rejected():
    _rejected(_tilted(15.0), "not stacked along their normal")
    _rejected(_tilted(TILT_TOLERANCE_DEGREES * 2), "gantry tilt")
    series_to_volume(_tilted(TILT_TOLERANCE_DEGREES / 2))


@pytest.mark.parametrize(
    ("keyword", "value", "check"),
    [
        ("ImagePositionPatient", [float("nan"), 0.0, 0.0], "ImagePositionPatient holds a non-finite value"),
        ("ImagePositionPatient", [float("inf"), 0.0, 0.0], "ImagePositionPatient holds a non-finite value"),
        ("ImageOrientationPatient", [1.0, 0.0, float("nan"), 0.0, 1.0, 0.0], "ImageOrientationPatient holds a non-fin"),
        ("PixelSpacing", [0.0, 1.2], "PixelSpacing .* is not positive and finite"),
        ("PixelSpacing", [-1.2, 1.2], "PixelSpacing .* is not positive and finite"),
        ("PixelSpacing", [float("nan"), 1.2], "PixelSpacing .* is not positive and finite"),
        ("ImagePositionPatient", [0.0, 0.0], "malformed"),
        ("RescaleSlope", 0, "RescaleSlope is 0"),
        ("RescaleSlope", float("nan"), "RescaleSlope is not finite"),
        ("RescaleIntercept", float("inf"), "RescaleIntercept is not finite"),
    ],
)
def test_non_finite_or_degenerate_header_values_are_rejected(keyword, value, check):
    datasets = _series()
    setattr(datasets[3], keyword, value)
    _rejected(datasets, check)


def test_duplicate_sop_instance_uids_are_rejected():
    """Two files of one instance UID at different positions: a SEG frame could reference the wrong slice."""
    datasets = _series()
    datasets[5].SOPInstanceUID = datasets[2].SOPInstanceUID
    _rejected(datasets, "SOPInstanceUID\\(s\\) occur more than once")


def test_rescale_intercept_and_32_bit_offsets_keep_the_image():
    """RescaleIntercept -1000 on 16-bit data and 32-bit storage with a 2**31 offset give the plain image (the series'
    minimum is subtracted in float64), exactly."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 4000, SHAPE).astype(np.float32)
    plain = series_to_volume(_series(volume=volume)).array
    datasets = _series(volume=volume)
    for ds in datasets:
        ds.RescaleIntercept, ds.RescaleSlope = -1000, 1
    np.testing.assert_array_equal(series_to_volume(datasets).array, plain)
    wide = _series(volume=volume)
    for ds in wide:
        stored = np.frombuffer(ds.PixelData, np.uint16).astype(np.int64) + 2**31 - 5000
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
        ds.PixelData = stored.astype(np.uint32).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = -(2**31), 1
    np.testing.assert_array_equal(series_to_volume(wide).array, plain)
    scaled = _series(volume=volume)
    for ds in scaled:
        ds.RescaleSlope, ds.RescaleIntercept = 0.25, 12.5
    np.testing.assert_allclose(series_to_volume(scaled).array, plain * 0.25, rtol=1e-6)
