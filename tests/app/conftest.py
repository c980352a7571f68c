"""Fixtures shared by the application tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import make_series
from pydicom.uid import generate_uid


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> tuple[Path, np.ndarray, str]:
    """A study with a synthetic FLAIR on an oblique grid (plus its truth), a localizer and a CT series, nested."""
    from scripts.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("dicom")
    dataset = json.loads(
        generate_dataset(
            root / "nifti", 1, seed=5, spacing=2.0, modalities=["flair"], lesion_weights={"glioma": 1.0}, native=True
        ).read_text()
    )
    entry = dataset["training"][0]
    image = nib.load(root / "nifti" / entry["image"])
    truth = np.asarray(nib.load(root / "nifti" / entry["label"]).dataobj) > 0
    study_uid = generate_uid()
    series = {
        "flair": make_series(np.asarray(image.dataobj), image.affine, 3, "AX FLAIR", study_uid),
        "loc": make_series(np.ones((16, 16, 3)), np.diag([2.0, 2.0, 5.0, 1.0]), 1, "Localizer", study_uid),
        "ct": make_series(np.ones((16, 16, 10)), np.diag([1.0, 1.0, 2.0, 1.0]), 2, "HEAD CT", study_uid, "CT"),
    }
    folder = root / "in"
    for name, datasets in series.items():
        for index, ds in enumerate(reversed(datasets)):  # files in reverse slice order
            path = folder / name / "sub" / f"{index:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM")
    return folder, truth, study_uid
