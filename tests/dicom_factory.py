"""Synthetic single-frame MR DICOM series from (X, Y, Z) volumes with RAS affines, for tests."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from operators.dicom_series import LPS_TO_RAS


def make_series(
    volume: np.ndarray,
    affine: np.ndarray,
    series_number: int = 5,
    description: str = "T2 TSE",
    study: str | None = None,
    modality: str = "MR",
) -> list[Dataset]:
    """Single-frame MR Image Storage instances of an (X, Y, Z) volume with a RAS affine (one per Z slice)."""
    lps = LPS_TO_RAS @ affine
    column_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing)]
    study, series, frame = study or generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P0", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, k + 1
        ds.SeriesDescription = description
        ds.Manufacturer, ds.PositionReferenceIndicator = "Test", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6) for v in lps[:3] @ np.array([0, 0, k, 1.0])]
        ds.PixelSpacing = [round(float(row_spacing), 6), round(float(column_spacing), 6)]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.uint16)).tobytes()
        datasets.append(ds)
    return datasets
