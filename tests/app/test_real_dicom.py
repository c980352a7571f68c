"""Real vendor and toolkit DICOM files (nibabel's and pydicom's test data): Enhanced MR, compressed transfer syntaxes,
truncated files."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
from dicom_factory import DCIODVFY, dciodvfy_errors

from operators.dicom_series import SeriesRejected, series_to_volume
from operators.modality_router import SeriesHeader, classify, load_rules
from operators.seg_writer import build_seg
from operators.study_loader import read_pixels

NIBABEL_DICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_philips_enhanced_mprage_becomes_a_volume_and_gets_a_valid_seg(tmp_path):
    """A real Philips Enhanced MR instance (176 sagittal frames, 1 mm): routed as T1, stacked from its functional
    groups, and its SEG maps frame by frame (and validates)."""
    raw = gzip.decompress((NIBABEL_DICOM / "philips_mprage.dcm.gz").read_bytes())
    source = pydicom.dcmread(io.BytesIO(raw))
    assert classify(SeriesHeader.from_dataset(source), load_rules()).modality == "t1"
    volume = series_to_volume([source])
    assert volume.array.shape == (256, 256, 176)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), [1.0, 1.0, 1.0], atol=0.01)
    assert abs(volume.affine[0, 2]) > 0.99  # sagittal: slices step along left-right
    np.testing.assert_array_equal(volume.array[:, :, 0], source.pixel_array[volume.frames[0]].T.astype(np.float32))
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[100:140, 90:130, 80:100] = 1
    seg_path = tmp_path / "seg.dcm"
    assert "PixelMeasuresSequence" not in source.SharedFunctionalGroupsSequence[0]  # Philips: per frame only
    build_seg(volume, labels, "MoME", "0.4.0").save_as(seg_path)
    assert "PixelMeasuresSequence" not in source.SharedFunctionalGroupsSequence[0]  # the source is not modified
    read = hd.seg.segread(seg_path)
    for k in (79, 80, 99, 100):
        frame = read.get_pixels_by_source_frame(
            source_sop_instance_uid=source.SOPInstanceUID, source_frame_numbers=[volume.frames[k] + 1],
            combine_segments=True,
        )[0]  # fmt: skip
        np.testing.assert_array_equal(frame, labels[:, :, k].T)
    if DCIODVFY:
        assert dciodvfy_errors(seg_path) == []


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"],
)
def test_compressed_and_big_endian_files_decode_like_the_original(name):
    header = pydicom.dcmread(PYDICOM_FILES / name, stop_before_pixels=True)
    header.filename = str(PYDICOM_FILES / name)
    (full,) = read_pixels([header], "series test")
    reference = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").pixel_array
    np.testing.assert_array_equal(full.pixel_array, reference)


def test_truncated_pixel_data_is_a_series_rejection():
    truncated = pydicom.dcmread(PYDICOM_FILES / "MR_truncated.dcm")
    copies = []
    for k in range(8):  # make a stack of it so that only the pixel data are wrong
        ds = pydicom.dcmread(PYDICOM_FILES / "MR_truncated.dcm")
        ds.ImagePositionPatient = [0.0, 0.0, float(k) * 2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"  # each copy its own instance
        copies.append(ds)
    assert truncated.Rows * truncated.Columns * 2 > len(truncated.PixelData)
    with pytest.raises(SeriesRejected, match="pixel data cannot be decoded"):
        series_to_volume(copies)
