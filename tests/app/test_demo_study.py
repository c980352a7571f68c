"""The embedded demo study that ``make demo`` runs: deterministic, valid DICOM, routed as its descriptions say."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
from dicom_factory import DCIODVFY, dciodvfy_errors

from app.demo_study import make_demo_study
from operators.dicom_series import series_to_volume
from operators.modality_router import load_rules
from operators.study import route_study
from operators.study_loader import scan_studies


def test_demo_study_routes_five_contrasts_and_rejects_the_rest(tmp_path):
    info = make_demo_study(tmp_path / "study")
    ((study_uid, series),) = scan_studies(tmp_path / "study" / "dicom").studies.items()
    assert study_uid == info["study_uid"] and len(series) == 7
    work = route_study(study_uid, series, load_rules())
    routed = {d["description"]: (d["modality"], d["rule"]) for d in work.decisions}
    assert routed == {
        "3 PLANE LOC": (None, "localizer-text"),
        "AX T1 SE": ("t1", "t1"),
        "AX T2 TSE": ("t2", "t2"),
        "AX T2 FLAIR": ("flair", "flair"),
        "AX DWI b1000 TRACEW": ("dwi", "dwi"),
        "AX DWI ADC": (None, "derived-map"),
        "AX T1 SE POST GAD": ("t1ce", "t1ce"),
    }
    assert sorted(task.modality for task in work.tasks) == ["dwi", "flair", "t1", "t1ce", "t2"]
    for modality, entry in info["series"].items():  # each series is on the grid of its truth label
        (task,) = [t for t in work.tasks if t.modality == modality]
        volume = series_to_volume([pydicom.dcmread(ds.filename) for ds in task.instances])
        truth = nib.load(tmp_path / "study" / "nifti" / entry["label"])
        np.testing.assert_allclose(volume.affine, truth.affine, atol=1e-3)
        assert volume.array.shape == truth.shape and np.asarray(truth.dataobj).sum() > 0
    if DCIODVFY:
        first = sorted((tmp_path / "study" / "dicom").rglob("*.dcm"))[0]
        assert dciodvfy_errors(first) == []
    again = make_demo_study(tmp_path / "again")  # deterministic: the same images (new UIDs)
    for name in ("nifti/imagesTr", "nifti_dwi/imagesTr"):
        (first,) = list((tmp_path / "study" / name).glob("*_t1_0000.nii.gz")) or [None]
        first = first or next((tmp_path / "study" / name).glob("*.nii.gz"))
        second = tmp_path / "again" / first.relative_to(tmp_path / "study")
        np.testing.assert_array_equal(np.asarray(nib.load(first).dataobj), np.asarray(nib.load(second).dataobj))
    assert again["study_uid"] != info["study_uid"]
