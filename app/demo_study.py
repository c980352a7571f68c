"""The embedded demo DICOM study: one synthetic subject on real anatomy, all five MoME contrasts, as MR series.

Made deterministically (seeded) by the bundle's generator (``scripts.synthetic``, MNI152 2009a anatomy): a glioma in
T1, T1ce, T2 and FLAIR and an acute infarct in DWI (the contrasts each lesion type is labelled in for MoME's
training data), each contrast on its own oblique scanner grid, written as single-frame MR Image Storage
series whose descriptions and acquisition parameters (TR, TE, TI, contrast agent, b-value, ImageType) are what the
modality router reads. A localizer and an ADC map are added so the demo shows rejections too. Small: 2 mm voxels,
about 20 MB for the study.

``series_datasets`` (volume + RAS affine -> datasets) is also what the tests build their DICOM from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from operators.dicom_series import LPS_TO_RAS

__all__ = ["DEMO_SERIES", "make_demo_study", "save_series", "series_datasets"]

# modality -> (series number, description, extra header attributes)
DEMO_SERIES: dict[str, tuple[int, str, dict[str, Any]]] = {
    "t1": (3, "AX T1 SE", {"RepetitionTime": 550, "EchoTime": 12, "EchoTrainLength": 1}),
    "t2": (4, "AX T2 TSE", {"RepetitionTime": 4500, "EchoTime": 95, "EchoTrainLength": 15}),
    "flair": (
        5,
        "AX T2 FLAIR",
        {"RepetitionTime": 9000, "EchoTime": 110, "InversionTime": 2500, "ScanningSequence": ["SE", "IR"]},
    ),
    "dwi": (
        6,
        "AX DWI b1000 TRACEW",
        {"RepetitionTime": 5000, "EchoTime": 80, "DiffusionBValue": 1000, "ScanningSequence": ["EP"]},
    ),
    "t1ce": (
        8,
        "AX T1 SE POST GAD",
        {"RepetitionTime": 550, "EchoTime": 12, "EchoTrainLength": 1, "ContrastBolusAgent": "Gadobutrol"},
    ),
}


def series_datasets(
    volume: np.ndarray,
    affine: np.ndarray,
    series_number: int = 5,
    description: str = "T2 TSE",
    study: str | None = None,
    modality: str = "MR",
    extra: Mapping[str, Any] | None = None,
    frame_of_reference: str | None = None,
) -> list[Dataset]:
    """Single-frame MR Image Storage instances of an (X, Y, Z) volume with a RAS affine (one per Z slice)."""
    lps = LPS_TO_RAS @ affine
    column_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing)]
    study, series, frame = study or generate_uid(), generate_uid(), frame_of_reference or generate_uid()
    pixels = np.clip(np.round(volume), 0, 65535).astype(np.uint16)
    datasets = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^Synthetic", "MOME-DEMO", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, k + 1
        ds.SeriesDescription, ds.Laterality, ds.PatientPosition = description, "", "HFS"
        # MR Image module: Type 1 values and Type 2 attributes present (empty unless ``extra`` gives them)
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = None, None, None
        ds.Manufacturer, ds.PositionReferenceIndicator = "MoME synthetic", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6) for v in lps[:3] @ np.array([0, 0, k, 1.0])]
        ds.PixelSpacing = [round(float(row_spacing), 6), round(float(column_spacing), 6)]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets


def save_series(datasets: list[Dataset], folder: Path) -> Path:
    """Writes each instance as ``folder/IMG<n>.dcm`` (DICOM Part 10)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ds.save_as(folder / f"IMG{index + 1:04d}.dcm", enforce_file_format=True)
    return folder


def make_demo_study(out: Path, seed: int = 7) -> dict[str, Any]:
    """Writes the demo study under ``out/dicom`` and its NIfTI truth under ``out/nifti``; returns a description."""
    from scripts.synthetic import PLUS_MODALITIES, generate_dataset

    # Each lesion type in the contrasts it is labelled in for MoME's training data: a glioma on T1/T1ce/T2/FLAIR and an
    # acute infarct on DWI (a second synthetic subject; each series is registered on its own).
    glioma = generate_dataset(
        out / "nifti", 1, seed=seed, spacing=2.0, modalities=list(PLUS_MODALITIES),
        lesion_weights={"glioma": 1.0}, native=True, all_contrasts=True,
    )  # fmt: skip
    entries = json.loads(glioma.read_text())["training"]
    stroke = generate_dataset(
        out / "nifti_dwi", 1, seed=seed, spacing=2.0, modalities=["dwi"], lesion_weights={"stroke_acute": 1.0},
        native=True,
    )  # fmt: skip
    for entry in json.loads(stroke.read_text())["training"]:
        entries.append({**entry, "image": f"../nifti_dwi/{entry['image']}", "label": f"../nifti_dwi/{entry['label']}"})
    study_uid = generate_uid()
    series = {}
    for entry in entries:
        number, description, extra = DEMO_SERIES[entry["modality"]]
        image = nib.load(out / "nifti" / entry["image"])
        volume = np.asarray(image.dataobj, dtype=np.float32)
        datasets = series_datasets(volume, image.affine, number, description, study_uid, extra=extra)
        save_series(datasets, out / "dicom" / f"{number:02d}_{entry['modality']}")
        series[entry["modality"]] = {"series_uid": str(datasets[0].SeriesInstanceUID), "label": entry["label"]}
    scout = np.full((64, 64, 3), 100.0)
    localizer = series_datasets(scout, np.diag([4.0, 4.0, 30.0, 1.0]), 1, "3 PLANE LOC", study_uid)
    save_series(localizer, out / "dicom" / "01_localizer")
    adc_source = nib.load(out / "nifti" / entries[-1]["image"])
    adc = series_datasets(np.asarray(adc_source.dataobj) * 0.5, adc_source.affine, 7, "AX DWI ADC", study_uid,
                          extra={"ImageType": ["DERIVED", "PRIMARY", "ADC"]})  # fmt: skip
    save_series(adc, out / "dicom" / "07_adc")
    return {"study_uid": study_uid, "series": series}
