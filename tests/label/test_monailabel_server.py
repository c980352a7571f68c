"""MoME in a real MONAI Label server (``label/``, ``.venv-label``), exercised over HTTP on loopback.

The server runs ``monailabel start_server --app label`` in the MONAI Label environment that ``make label`` creates
(CI creates it too). Without that environment these tests fail: they never skip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from label_client import dice, infer, label_and_record, label_server

SEED = 7  # the demo study's seed (app/demo_study.py)


PENDING = ("SUBMITTED", "RUNNING")  # MONAI Label's states of a background task before it ends
BRATS_REGIONS = {"whole tumour": (1, 2, 3), "tumour core": (1, 3), "enhancing tumour": (3,)}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> tuple[Path, Path]:
    """A MONAI Label studies folder, truths apart: the demo study's FLAIR and DWI (native space) and its glioma's
    T1/T1ce/T2/FLAIR as one co-registered 4-channel image (``demo_glioma``, BraTS labels)."""
    from scripts.synthetic import PLUS_MODALITIES, generate_dataset

    root = tmp_path_factory.mktemp("label")
    studies, truth = root / "studies", root / "truth"
    studies.mkdir()
    truth.mkdir()
    for modality, lesion in (("flair", "glioma"), ("dwi", "stroke_acute")):
        made = root / f"made_{modality}"
        datalist = generate_dataset(
            made, 1, seed=SEED, spacing=2.0, modalities=[modality], lesion_weights={lesion: 1.0}, native=True
        )
        (entry,) = json.loads(datalist.read_text())["training"]
        (made / entry["image"]).rename(studies / f"demo_{modality}.nii.gz")
        (made / entry["label"]).rename(truth / f"demo_{modality}.nii.gz")
    made = root / "made_glioma"
    datalist = generate_dataset(
        made, 1, seed=SEED, spacing=2.0, modalities=list(PLUS_MODALITIES), lesion_weights={"glioma": 1.0},
        multichannel=True, label_scheme="brats",
    )  # fmt: skip
    (entry,) = json.loads(datalist.read_text())["training"]
    channels = [nib.load(made / image) for image in entry["image"]]
    stacked = np.stack([np.asarray(c.dataobj, np.float32) for c in channels], axis=-1)
    nib.save(nib.Nifti1Image(stacked, channels[0].affine), studies / "demo_glioma.nii.gz")
    (made / entry["label"]).rename(truth / "demo_glioma.nii.gz")
    return studies, truth


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory) -> str:
    with label_server(str(studies[0]), tmp_path_factory.mktemp("label_server")) as url:
        yield url


def test_info_lists_mome_and_mome_plus_with_their_labels(server):
    info = requests.get(f"{server}/info/").json()
    mome, plus = info["models"]["mome"], info["models"]["mome_plus"]
    assert mome["type"] == plus["type"] == "segmentation" and mome["dimension"] == plus["dimension"] == 3
    assert mome["labels"] == {"lesion": 1} and "modality" in mome["config"]
    assert plus["labels"] == {"necrotic_core": 1, "oedema": 2, "enhancing": 3}
    assert plus["config"]["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert info["name"] == "MoME" and info["labels"] == ["lesion", "necrotic_core", "oedema", "enhancing"]


def test_mome_segments_a_native_image_on_its_own_grid(server, studies, tmp_path):
    image, record = label_and_record(infer(server, "demo_flair"), tmp_path)
    source = nib.load(studies[0] / "demo_flair.nii.gz")
    assert image.shape == source.shape and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
    truth = np.asarray(nib.load(studies[1] / "demo_flair.nii.gz").dataobj)
    assert dice(np.asarray(image.dataobj), truth) >= 0.7
    assert record["modality"] == "flair" and record["modality_source"] == "image name"
    assert record["label_names"] == {"lesion": 1} and record["lesion_volume_ml"] > 1
    assert record["warnings"] == [] and record["registration"]["brain_dice"] > 0.8 and record["seconds"]["total"] > 0


def test_an_uploaded_image_takes_its_contrast_from_the_request(server, studies, tmp_path):
    upload = ("scan.nii.gz", (studies[0] / "demo_dwi.nii.gz").read_bytes())
    image, record = label_and_record(infer(server, params={"modality": "dwi"}, upload=upload), tmp_path)
    truth = np.asarray(nib.load(studies[1] / "demo_dwi.nii.gz").dataobj)
    assert image.shape == truth.shape and dice(np.asarray(image.dataobj), truth) >= 0.7
    assert record["modality"] == "dwi" and record["modality_source"] == "request"


def test_bad_requests_get_a_4xx_naming_the_reason_and_the_server_keeps_serving(server, studies, tmp_path):
    flair = (studies[0] / "demo_flair.nii.gz").read_bytes()
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), flat)
    cases = [
        (infer(server, "no_such_case"), 404, "'no_such_case': not in the datastore"),
        (infer(server, "demo_flair", {"modality": "ct"}), 400, "modality 'ct': not one of t1, t1ce, t2, flair, dwi"),
        (infer(server, upload=("scan.nii.gz", flair)), 400, "no modality"),
        (infer(server, params={"modality": "t1"}, upload=("flat.nii.gz", flat.read_bytes())), 422, "3-D volume"),
        (infer(server, params={"modality": "t1"}, upload=("broken.nii.gz", flair[:5000])), 422, "cannot be read"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status and reason in response.json()["detail"], response.text[:500]
    assert requests.get(f"{server}/info/").status_code == 200


def test_mome_plus_segments_the_tumour_regions_of_a_four_channel_image(server, studies, tmp_path):
    image, record = label_and_record(infer(server, "demo_glioma", model="mome_plus"), tmp_path)
    source = nib.load(studies[0] / "demo_glioma.nii.gz")
    assert image.shape == source.shape[:3] and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
    labels, truth = np.asarray(image.dataobj), np.asarray(nib.load(studies[1] / "demo_glioma.nii.gz").dataobj)
    for region, values in BRATS_REGIONS.items():
        assert dice(np.isin(labels, values), np.isin(truth, values)) >= 0.7, region
    assert record["reference"] == "t1ce" and record["modalities_available"] == ["t1", "t1ce", "t2", "flair"]
    assert set(record["region_volume_ml"]) == {"necrotic_core", "oedema", "enhancing"}


def test_mome_plus_takes_a_subset_of_contrasts_named_by_the_request(server, studies, tmp_path):
    glioma = nib.load(studies[0] / "demo_glioma.nii.gz")
    pair = np.asarray(glioma.dataobj)[..., [1, 3]]  # t1ce, flair
    path = tmp_path / "pair.nii.gz"
    nib.save(nib.Nifti1Image(pair, glioma.affine), path)
    upload = ("pair.nii.gz", path.read_bytes())
    response = infer(server, params={"channels": ["t1ce", "flair"]}, upload=upload, model="mome_plus")
    image, record = label_and_record(response, tmp_path)
    truth = np.asarray(nib.load(studies[1] / "demo_glioma.nii.gz").dataobj)
    assert dice(np.asarray(image.dataobj) > 0, truth > 0) >= 0.7
    assert record["modalities_available"] == ["t1ce", "flair"] and record["channels"] == ["t1ce", "flair"]


def test_mome_plus_bad_requests_name_what_is_wrong(server, studies, tmp_path):
    glioma = nib.load(studies[0] / "demo_glioma.nii.gz")
    one = np.zeros(glioma.shape, np.float32)
    one[..., 3] = np.asarray(glioma.dataobj)[..., 3]
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(one, glioma.affine), path)
    upload = ("one.nii.gz", path.read_bytes())
    cases = [
        (infer(server, "demo_glioma", {"channels": ["t1", "ct"]}, model="mome_plus"), 400, "none twice"),
        (infer(server, "demo_glioma", {"channels": ["t1", "t2"]}, model="mome_plus"), 422, "4 channel(s) but"),
        (infer(server, upload=upload, model="mome_plus"), 422, "holds flair (an all-zero channel is missing)"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status and reason in response.json()["detail"], response.text[:500]


def test_a_saved_label_fine_tunes_the_served_model_and_the_shipped_one_can_be_restored(server, studies, tmp_path):
    """PUT a label, train (synchronously, a tiny run): the next inference runs on the new weights; restore undoes it."""
    _, before = label_and_record(infer(server, "demo_dwi"), tmp_path)
    assert before["weights"] == "shipped"
    truth = (studies[1] / "demo_dwi.nii.gz").read_bytes()
    saved = requests.put(
        f"{server}/datastore/label", params={"image": "demo_dwi", "tag": "final"}, files={"label": ("l.nii.gz", truth)}
    )
    assert saved.status_code == 200, saved.text[:500]
    params = {"epochs": 1, "iterations_per_epoch": 2, "learning_rate": 1e-3}
    trained = requests.post(f"{server}/train/mome", params={"run_sync": True}, json=params)
    assert trained.status_code == 200, trained.text[:2000]
    stats = trained.json()
    assert stats["cases"] == ["demo_dwi.nii.gz"] and stats["weights"] == "fine-tuned", stats
    assert "demo_flair.nii.gz" not in stats["cases"]  # no final label
    _, after = label_and_record(infer(server, "demo_dwi"), tmp_path)
    assert after["weights"] == "fine-tuned" and after["sha256"] == stats["sha256"] != before["sha256"]
    assert after["lesion_volume_ml"] != before["lesion_volume_ml"]  # the new weights really run
    restored = requests.post(f"{server}/train/mome", params={"run_sync": True}, json={"restore": True}).json()
    assert restored["restored"] and restored["weights"] == "shipped"
    _, again = label_and_record(infer(server, "demo_dwi"), tmp_path)
    assert again["sha256"] == before["sha256"] and again["lesion_volume_ml"] == before["lesion_volume_ml"]


def test_training_in_the_background_as_clients_start_it(server, tmp_path):
    """3D Slicer starts training without run_sync: MONAI Label runs the task in a subprocess of the app; when it is
    done, the server's next inference runs on the weights it wrote."""
    params = {"epochs": 1, "iterations_per_epoch": 2, "learning_rate": 1e-3}
    started = requests.post(f"{server}/train/mome", json=params)
    assert started.status_code == 200, started.text[:2000]
    deadline = time.monotonic() + 600
    while (task := requests.get(f"{server}/train/").json())["status"] in PENDING and time.monotonic() < deadline:
        time.sleep(2)
    assert task["status"] == "DONE", task
    _, after = label_and_record(infer(server, "demo_dwi"), tmp_path)
    assert after["weights"] == "fine-tuned"
    restored = requests.post(f"{server}/train/mome", params={"run_sync": True}, json={"restore": True}).json()
    assert restored["weights"] == "shipped"


def test_active_learning_offers_the_unlabelled_image_whose_experts_disagree_most(server):
    response = requests.post(f"{server}/activelearning/expert_disagreement", json={})
    assert response.status_code == 200, response.text[:1000]
    offered = response.json()
    scores = offered["scores"]
    assert scores and offered["id"] == max(scores, key=scores.__getitem__) and 0 < offered["score"] <= 1
    assert set(scores) <= {"demo_flair", "demo_dwi"}  # a labelled image is never offered
    assert "3-D volume" in offered["skipped"]["demo_glioma"]  # multi-channel: for mome_plus, not scored
    info = requests.get(f"{server}/info/").json()
    assert "expert_disagreement" in info["strategies"] and "mome" in info["trainers"]
