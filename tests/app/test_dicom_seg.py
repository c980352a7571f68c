"""DICOM series -> volume (sorting, geometry checks) and DICOM-SEG on the exact source grid (highdicom round trip)."""

from __future__ import annotations

import io
import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import DCIODVFY, dciodvfy_errors, make_series
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from operators.dicom_series import SeriesRejected, series_to_volume
from operators.seg_writer import build_seg, seg_series_number
from scripts.synthetic import _rotation

SHAPE = (24, 20, 12)  # (columns, rows, slices)


def oblique_affine(flip: bool) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.deg2rad([12.0, -25.0, 33.0])) @ np.diag([0.9, 1.1, 4.0])
    if flip:  # slices stacked against the normal and a negated row axis
        affine[:3, 2] *= -1
        affine[:3, 1] *= -1
    affine[:3, 3] = [-40.0, 25.0, 10.0]
    return affine


@pytest.mark.parametrize("flip", [False, True])
def test_series_becomes_a_volume_on_its_exact_grid_in_any_order(flip):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 4000, size=SHAPE).astype(np.float32)
    affine = oblique_affine(flip)
    datasets = make_series(volume, affine)
    random.Random(1).shuffle(datasets)
    result = series_to_volume(datasets)
    assert result.array.shape == SHAPE
    # every voxel of the result sits at the world position of the same value in the original
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    world = index @ result.affine[:3, :3].T + result.affine[:3, 3]
    original = np.rint((world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)
    np.testing.assert_allclose(original @ affine[:3, :3].T + affine[:3, 3], world, atol=1e-3)
    np.testing.assert_array_equal(volume[tuple(original.T)], result.array[tuple(index.T)])
    positions = [float(np.dot(np.cross(*np.reshape(d.ImageOrientationPatient, (2, 3))), d.ImagePositionPatient))
                 for d in result.instances]  # fmt: skip
    assert positions == sorted(positions)


def test_seg_round_trip_one_frame_per_source_slice(tmp_path):
    volume = np.full(SHAPE, 100.0, dtype=np.float32)
    datasets = make_series(volume, oblique_affine(True), series_number=7)
    random.Random(2).shuffle(datasets)
    series = series_to_volume(datasets)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:12, 3:9, 2:6] = 1
    labels[20, 15, 9] = 1
    seg = build_seg(series, labels, "MoME brain lesion MRI segmentation", "0.3.0")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    if DCIODVFY:
        (tmp_path / "seg.dcm").write_bytes(buffer.getvalue())
        assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    read = hd.seg.segread(io.BytesIO(buffer.getvalue()))
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and read.SegmentationType == "BINARY"
    assert int(read.NumberOfFrames) == SHAPE[2]  # empty frames kept
    assert read.SeriesNumber == seg_series_number(7) == 7007 and "research use" in read.SeriesDescription
    segment = read.SegmentSequence[0]
    assert segment.SegmentLabel == "Lesion" and segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0.3.0"
    for k, source in enumerate(series.instances):
        frame = read.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True
        )[0]
        np.testing.assert_array_equal(frame, labels[:, :, k].T)
    empty = build_seg(series, labels, "MoME", "0.3.0", omit_empty_frames=True)
    assert int(empty.NumberOfFrames) == 5


def test_geometry_problems_are_rejected_with_the_series_named():
    volume = np.ones(SHAPE, dtype=np.float32)
    base = make_series(volume, oblique_affine(False))
    uid = base[0].SeriesInstanceUID
    cases = {
        "irregular slice spacing": base[:5] + base[6:],
        "duplicate slice positions": base + [_with_new_uid(base[3])],
        "at least 8": base[:4],
    }
    tilted = [pydicom.dcmread(_roundtrip(d)) for d in base]
    tilted[1].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    cases["different orientations"] = tilted
    for reason, datasets in cases.items():
        with pytest.raises(SeriesRejected, match=f"series {uid} \\(T2 TSE\\): .*{reason}"):
            series_to_volume(datasets)
    series = series_to_volume(base)
    with pytest.raises(ValueError, match="not on the source grid"):
        build_seg(series, np.zeros((2, 2, 2), np.uint8), "MoME", "0.3.0")
    with pytest.raises(ValueError, match=r"label values \[2\]"):
        build_seg(series, np.full(SHAPE, 2, np.uint8), "MoME", "0.3.0")


def _with_new_uid(ds: Dataset) -> Dataset:
    """A copy of an instance under its own SOPInstanceUID (a second acquisition at the same position)."""
    copy = pydicom.dcmread(_roundtrip(ds))
    copy.SOPInstanceUID = generate_uid()
    return copy


def _roundtrip(ds: Dataset) -> io.BytesIO:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def test_qc_image_is_radiological_and_through_the_largest_lesion():
    from operators.qc_image import qc_image

    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # voxel x runs towards the patient's left (LAS storage)
    affine[:3, 3] = [40.0, -40.0, -40.0]
    volume = np.random.default_rng(0).uniform(50, 150, (81, 81, 41)).astype(np.float32)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    # a lesion at the patient's right (+x), anterior (+y) and superior (+z): world (25, 25, 20)
    i, j, k = np.rint(np.linalg.inv(affine) @ [25.0, 25.0, 20.0, 1.0])[:3].astype(int)
    labels[i - 3 : i + 4, j - 3 : j + 4, k - 1 : k + 2] = 1
    labels[5:7, 5:7, 5] = 1  # a smaller lesion elsewhere
    picture = np.asarray(qc_image(volume, labels, affine, caption="t2"))
    red = picture[..., 0].astype(int) - picture[..., 1] > 60
    axial = red[:, : round(81 * 1.5)]  # first panel: 81 mm x 81 mm at 1.5 px/mm
    rows, cols = np.nonzero(axial)
    assert len(rows) > 50
    assert rows.mean() < axial.shape[0] / 2  # anterior at the top
    assert cols.mean() < axial.shape[1] / 2  # patient's right on the image's left
    # no lesion: an axial mosaic of 12 slices (2 rows of 6) instead of panels through a lesion, no overlay
    mosaic = qc_image(volume, np.zeros_like(labels), affine, caption="t2")
    panel_width = round(81 * 1.5 * 0.6)
    assert mosaic.width == 6 * (panel_width + 4) and mosaic.height == 2 * (panel_width + 4) + 28
    pixels = np.asarray(mosaic).astype(int)
    assert not (pixels[..., 0] - pixels[..., 1] > 60).any()


def sagittal_affine() -> np.ndarray:
    """Sagittal slices: columns along -y (anterior to posterior), rows along -z, slices along +x."""
    affine = np.zeros((4, 4))
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = [0, -0.9, 0], [0, 0, -1.1], [3.0, 0, 0]
    affine[:, 3] = [-20.0, 90.0, 60.0, 1.0]
    return affine


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools (dciodvfy) not installed")
@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique"])
def test_seg_passes_dciodvfy_and_references_every_source(tmp_path, orientation):
    affine = {"axial": np.diag([0.9, 1.1, 4.0, 1.0]), "sagittal": sagittal_affine(), "oblique": oblique_affine(True)}
    datasets = make_series(np.full(SHAPE, 300.0, np.float32), affine[orientation], series_number=4)
    random.Random(3).shuffle(datasets)
    series = series_to_volume(datasets)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:10, 2:8, 3:7] = 1
    seg_path = tmp_path / "seg.dcm"
    build_seg(series, labels, "MoME", "0.4.0").save_as(seg_path)
    source_path = tmp_path / "source.dcm"
    series.instances[0].save_as(source_path, enforce_file_format=True)
    assert dciodvfy_errors(source_path) == []
    assert dciodvfy_errors(seg_path) == []
    read = hd.seg.segread(seg_path)
    referenced = {item.ReferencedSOPInstanceUID for item in read.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in datasets}
    for k, source in enumerate(series.instances):
        frame = read.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0]
        np.testing.assert_array_equal(frame, labels[:, :, k].T)


def test_enhanced_mr_source_volume_and_seg_follow_its_frames(tmp_path):
    """An Enhanced MR instance (frames in shuffled order) gives the same volume as its single-frame series, and its
    SEG's frames map to the source frames, checked per frame through highdicom and by dciodvfy."""
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 3000, size=SHAPE).astype(np.float32)
    datasets = make_series(volume, oblique_affine(True), series_number=9)
    single = series_to_volume(datasets)
    shuffled = list(datasets)
    random.Random(5).shuffle(shuffled)
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        shuffled, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(), instance_number=1
    )
    enhanced = pydicom.dcmread(_roundtrip(enhanced))
    result = series_to_volume([enhanced])
    np.testing.assert_array_equal(result.array, single.array)
    np.testing.assert_allclose(result.affine, single.affine, atol=1e-5)
    assert result.instances == [enhanced] and sorted(result.frames) == list(range(SHAPE[2]))
    assert result.frames != list(range(SHAPE[2]))  # the frames are not in slice order: the mapping is exercised
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:9, 4:11, 2:8] = 1
    labels[:, :, 10] = 0
    labels[1, 1, 10] = 1
    seg_path = tmp_path / "seg.dcm"
    build_seg(result, labels, "MoME", "0.4.0").save_as(seg_path)
    read = hd.seg.segread(seg_path)
    assert int(read.NumberOfFrames) == SHAPE[2]
    for k, frame_index in enumerate(result.frames):
        frame = read.get_pixels_by_source_frame(
            source_sop_instance_uid=enhanced.SOPInstanceUID, source_frame_numbers=[frame_index + 1],
            combine_segments=True,
        )[0]  # fmt: skip
        np.testing.assert_array_equal(frame, labels[:, :, k].T)
    if DCIODVFY:
        assert dciodvfy_errors(seg_path) == []


def test_multi_frame_problems_are_rejected():
    datasets = make_series(np.ones(SHAPE, np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(), instance_number=1
    )
    with pytest.raises(SeriesRejected, match="several multi-frame instances"):
        series_to_volume([enhanced, enhanced])
    del enhanced.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    with pytest.raises(SeriesRejected, match="frame 4 lacks plane position"):
        series_to_volume([enhanced])


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless"])
def test_compressed_sources_decode_to_the_same_volume_and_seg(tmp_path, syntax):
    import copy

    import pydicom.uid

    volume = np.random.default_rng(6).integers(0, 3000, size=SHAPE).astype(np.float32)
    plain = make_series(volume, oblique_affine(False))
    compressed = []
    for ds in copy.deepcopy(plain):
        ds.compress(getattr(pydicom.uid, syntax))
        compressed.append(pydicom.dcmread(_roundtrip(ds)))
    assert compressed[0].file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    result = series_to_volume(compressed)
    np.testing.assert_array_equal(result.array, series_to_volume(plain).array)
    labels = (result.array > 2500).astype(np.uint8)
    seg_path = tmp_path / "seg.dcm"
    build_seg(result, labels, "MoME", "0.4.0").save_as(seg_path)
    read = hd.seg.segread(seg_path)
    frame = read.get_pixels_by_source_instance([result.instances[3].SOPInstanceUID], combine_segments=True)[0]
    np.testing.assert_array_equal(frame, labels[:, :, 3].T)
    if DCIODVFY:
        assert dciodvfy_errors(seg_path) == []
