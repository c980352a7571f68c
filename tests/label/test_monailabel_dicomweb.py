"""MoME's MONAI Label app on a DICOMweb datastore: a real MONAI Label server pointed at a real Orthanc, on loopback.

The demo study (T1, T1ce, T2, FLAIR, DWI, ADC, a localizer) is stored in Orthanc; the server lists its MR series, infers
on series UIDs (contrast from the series headers; MoME+ with the study's other series), and a submitted label goes back
to Orthanc as DICOM-SEG on the series' grid. Skipped where Orthanc is not installed (``.ci/run`` installs it); without
the MONAI Label environment the tests fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from dicom_factory import DCIODVFY, dciodvfy_errors
from label_client import dice, infer, label_and_record, label_server
from servers import ORTHANC_MISSING, running_orthanc

from operators.dicom_series import series_to_volume
from operators.study_loader import read_pixels, scan_studies

pytestmark = pytest.mark.skipif(ORTHANC_MISSING, reason="Orthanc with its DICOMweb plugin is not installed")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The demo study as DICOM (and its truths), with each series read by the operators."""
    from app.demo_study import make_demo_study

    root = tmp_path_factory.mktemp("demo")
    study = make_demo_study(root)
    study["root"] = root
    study["folders"] = {path.name.split("_", 1)[1]: path for path in sorted((root / "dicom").iterdir())}
    return study


@pytest.fixture(scope="module")
def pacs(demo, tmp_path_factory) -> dict:
    """Orthanc holding the demo study (stored over DICOMweb, STOW-RS)."""
    from dicomweb_client.api import DICOMwebClient

    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        client = DICOMwebClient(url=str(orthanc["dicomweb"]))
        files = sorted((demo["root"] / "dicom").rglob("*.dcm"))
        client.store_instances([pydicom.dcmread(path) for path in files])
        yield {**orthanc, "client": client}


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("label_dicomweb")
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(workdir / "cache")}
    with label_server(str(pacs["dicomweb"]), workdir, env) as url:
        yield url


def _truth(demo: dict, modality: str) -> nib.Nifti1Image:
    return nib.load(demo["root"] / "nifti" / demo["series"][modality]["label"])  # labels are named from nifti/


def _uid(demo: dict, modality: str) -> str:
    return demo["series"][modality]["series_uid"]


def test_the_pacs_mr_series_are_the_images(server, demo):
    info = requests.get(f"{server}/info/").json()
    assert set(info["models"]) == {"mome", "mome_plus"}
    stats = requests.get(f"{server}/datastore/").json()
    assert (
        len(demo["folders"]) == 7 and stats["total"] == 6
    )  # the MR series (MONAI Label's default: CT) but the 3-slice localizer
    volumes = {
        name: str(pydicom.dcmread(next(f.glob("*.dcm"))).SeriesInstanceUID) for name, f in demo["folders"].items()
    }
    del volumes["localizer"]
    for _ in range(5):  # clients are only offered series that can be volumes
        offered = requests.post(f"{server}/activelearning/random", json={})
        assert offered.status_code == 200 and offered.json()["id"] in volumes.values(), offered.text[:500]


def test_mome_on_a_series_uid_takes_the_contrast_from_the_series_headers(server, demo, tmp_path):
    image, record = label_and_record(infer(server, _uid(demo, "flair")), tmp_path)
    truth = _truth(demo, "flair")
    assert image.shape == truth.shape
    np.testing.assert_allclose(image.affine, truth.affine, atol=1e-3)
    assert dice(np.asarray(image.dataobj), np.asarray(truth.dataobj)) >= 0.7
    assert record["modality"] == "flair" and record["modality_source"].startswith("series headers")


def test_mome_plus_on_a_series_uid_uses_the_studys_other_contrasts(server, demo, tmp_path):
    image, record = label_and_record(infer(server, _uid(demo, "t1ce"), model="mome_plus"), tmp_path)
    truth = _truth(demo, "t1ce")
    assert image.shape == truth.shape
    np.testing.assert_allclose(image.affine, truth.affine, atol=1e-3)
    assert dice(np.asarray(image.dataobj) > 0, np.asarray(truth.dataobj) > 0) >= 0.7
    assert record["reference"] == "t1ce"
    assert record["series"] == {m: _uid(demo, m) for m in ("t1", "t1ce", "t2", "flair")}
    assert record["modalities_available"] == ["t1", "t1ce", "t2", "flair"]


def test_a_submitted_label_is_stored_in_the_pacs_as_dicom_seg_on_the_series_grid(server, demo, pacs, tmp_path):
    """3D Slicer's "submit label": PUT /datastore/label (tag final) -> a DICOM-SEG in Orthanc, frame k on slice k.

    The label is sent in another axis order than the series (x flipped): it is reordered, not resampled."""
    truth = _truth(demo, "flair")
    labels = np.asarray(truth.dataobj).astype(np.uint8)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = labels.shape[0] - 1
    sent = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(labels[::-1], truth.affine @ flip), sent)
    info = {"label_info": [{"name": "lesion", "idx": 1}]}
    response = requests.put(
        f"{server}/datastore/label",
        params={"image": _uid(demo, "flair"), "tag": "final"},
        data={"params": json.dumps(info)},
        files={"label": ("label.nii.gz", sent.read_bytes())},
    )
    assert response.status_code == 200, response.text[:2000]

    client = pacs["client"]
    (found,) = client.search_for_series(demo["study_uid"], search_filters={"Modality": "SEG"})
    (stored,) = client.retrieve_series(demo["study_uid"], found["0020000E"]["Value"][0])
    seg = hd.seg.Segmentation.from_dataset(stored)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == _uid(demo, "flair")
    assert seg.SegmentSequence[0].SegmentLabel == "Lesion"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    volume = _series_volume(demo, "flair")
    np.testing.assert_allclose(volume.affine, truth.affine, atol=1e-3)
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in volume.instances], combine_segments=True)
    np.testing.assert_array_equal(frames, labels.transpose(2, 1, 0))
    if DCIODVFY:
        path = tmp_path / "seg.dcm"
        stored.save_as(path)
        assert dciodvfy_errors(path) == []


def _series_volume(demo: dict, modality: str):
    (headers,) = scan_studies(demo["folders"][modality]).studies.values()
    return series_to_volume(read_pixels(next(iter(headers.values())), modality))


def test_labels_in_the_pacs_fine_tune_the_served_model(server, demo, pacs):
    """A DICOM-SEG another tool stored (here: the application's writer) is read onto its series' grid; training takes
    the PACS's labelled series, each with its contrast from its headers (after the submitted FLAIR label above)."""
    from operators.seg_writer import build_seg

    truth = np.asarray(_truth(demo, "t2").dataobj).astype(np.uint8)
    pacs["client"].store_instances([build_seg(_series_volume(demo, "t2"), truth, "another tool", "1")])
    datalist = requests.get(f"{server}/datastore/", params={"output": "train"}).json()
    assert isinstance(datalist, list), datalist
    by_series = {Path(item["image"]).name.split(".nii")[0]: item for item in datalist}
    assert set(by_series) == {_uid(demo, "flair"), _uid(demo, "t2")}
    t2 = by_series[_uid(demo, "t2")]
    assert t2["modality"] == "t2" and by_series[_uid(demo, "flair")]["modality"] == "flair"
    np.testing.assert_array_equal(np.asarray(nib.load(t2["label"]).dataobj), truth)

    params = {"epochs": 1, "iterations_per_epoch": 2, "learning_rate": 1e-3}
    trained = requests.post(f"{server}/train/mome", params={"run_sync": True}, json=params)
    assert trained.status_code == 200, trained.text[:2000]
    stats = trained.json()
    assert sorted(stats["cases"]) == sorted(f"{_uid(demo, m)}.nii.gz" for m in ("flair", "t2")), stats
    assert stats["weights"] == "fine-tuned" and stats["skipped"] == {}
    restored = requests.post(f"{server}/train/mome", params={"run_sync": True}, json={"restore": True}).json()
    assert restored["weights"] == "shipped"


def test_bad_requests_get_a_4xx_and_nothing_is_stored(server, demo, pacs, tmp_path):
    truth = _truth(demo, "flair")
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(truth.dataobj)[1:].astype(np.uint8), truth.affine), cropped)
    segs_before = pacs["client"].search_for_series(search_filters={"Modality": "SEG"})
    wrong_grid = requests.put(
        f"{server}/datastore/label",
        params={"image": _uid(demo, "t2"), "tag": "final"},
        files={"label": ("cropped.nii.gz", cropped.read_bytes())},
    )
    localizer = pydicom.dcmread(next(demo["folders"]["localizer"].glob("*.dcm")), stop_before_pixels=True)
    cases = [
        (infer(server, "1.2.3.4.5"), 404, "not a series of"),
        (infer(server, str(localizer.SeriesInstanceUID)), 422, "slices"),
        (infer(server, "../../etc/passwd"), 404, "not a SeriesInstanceUID"),
        (infer(server, _uid(demo, "dwi"), model="mome_plus"), 422, "MoME+ takes a t1, t1ce, t2, flair series"),
        (wrong_grid, 422, "not on the grid of series"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status and reason in response.json()["detail"], response.text[:500]
    assert pacs["client"].search_for_series(search_filters={"Modality": "SEG"}) == segs_before
    assert requests.get(f"{server}/info/").status_code == 200
