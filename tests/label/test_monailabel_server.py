"""MoME in a real MONAI Label server (``label/``, ``.venv-label``), exercised over HTTP on loopback.

The server runs ``monailabel start_server --app label`` in the MONAI Label environment that ``make label`` creates
(CI creates it too). Without that environment these tests fail: they never skip.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from servers import free_port, running_server

REPO = Path(__file__).resolve().parents[2]
LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"
SEED = 7  # the demo study's seed (app/demo_study.py)


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction > 0, truth > 0
    return 2 * float((prediction & truth).sum()) / max(1, int(prediction.sum() + truth.sum()))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> tuple[Path, Path]:
    """A MONAI Label studies folder with the demo study's FLAIR and DWI (native space), and their truths apart."""
    from scripts.synthetic import generate_dataset

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
    return studies, truth


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory) -> str:
    assert LABEL_PYTHON.is_file(), f"{LABEL_PYTHON}: no MONAI Label environment; run `make label`"
    port = free_port()
    command = [str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(REPO / "label")]
    command += ["--studies", str(studies[0]), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--conf", "bundle", str(REPO / "bundle"), "--conf", "device", "cpu"]
    env = {**os.environ, "MONAI_LABEL_SESSIONS": "false", "PYTHONPATH": ""}
    log = tmp_path_factory.mktemp("label_log") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running_server(command, f"{url}/info/", log, timeout_s=240, env=env, cwd=studies[0].parent):
        yield url


def _infer(server: str, image: str = "", params: dict | None = None, upload: tuple[str, bytes] | None = None):
    files = {"file": upload} if upload else None
    data = {"params": json.dumps(params or {})}
    return requests.post(f"{server}/infer/mome", params={"image": image, "output": "all"}, data=data, files=files)


def _label_and_record(response: requests.Response, tmp_path: Path) -> tuple[nib.Nifti1Image, dict]:
    """The label image and the result record of a multipart ``output=all`` answer."""
    assert response.status_code == 200, response.text[:2000]
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    record = json.loads(parts["params"].get_content())
    path = tmp_path / "label.nii.gz"
    path.write_bytes(parts["image"].get_payload(decode=True))
    return nib.load(path), record


def test_info_lists_mome_with_its_labels(server):
    info = requests.get(f"{server}/info/").json()
    mome = info["models"]["mome"]
    assert mome["type"] == "segmentation" and mome["dimension"] == 3
    assert mome["labels"] == {"lesion": 1} and info["labels"] == ["lesion"]
    assert info["name"] == "MoME" and "modality" in mome["config"]


def test_mome_segments_a_native_image_on_its_own_grid(server, studies, tmp_path):
    image, record = _label_and_record(_infer(server, "demo_flair"), tmp_path)
    source = nib.load(studies[0] / "demo_flair.nii.gz")
    assert image.shape == source.shape and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
    truth = np.asarray(nib.load(studies[1] / "demo_flair.nii.gz").dataobj)
    assert _dice(np.asarray(image.dataobj), truth) >= 0.7
    assert record["modality"] == "flair" and record["modality_source"] == "image name"
    assert record["label_names"] == {"lesion": 1} and record["lesion_volume_ml"] > 1
    assert record["warnings"] == [] and record["registration"]["brain_dice"] > 0.8 and record["seconds"]["total"] > 0


def test_an_uploaded_image_takes_its_contrast_from_the_request(server, studies, tmp_path):
    upload = ("scan.nii.gz", (studies[0] / "demo_dwi.nii.gz").read_bytes())
    image, record = _label_and_record(_infer(server, params={"modality": "dwi"}, upload=upload), tmp_path)
    truth = np.asarray(nib.load(studies[1] / "demo_dwi.nii.gz").dataobj)
    assert image.shape == truth.shape and _dice(np.asarray(image.dataobj), truth) >= 0.7
    assert record["modality"] == "dwi" and record["modality_source"] == "request"


def test_bad_requests_get_a_4xx_naming_the_reason_and_the_server_keeps_serving(server, studies, tmp_path):
    flair = (studies[0] / "demo_flair.nii.gz").read_bytes()
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), flat)
    cases = [
        (_infer(server, "no_such_case"), 404, "'no_such_case': not in the datastore"),
        (_infer(server, "demo_flair", {"modality": "ct"}), 400, "modality 'ct': not one of t1, t1ce, t2, flair, dwi"),
        (_infer(server, upload=("scan.nii.gz", flair)), 400, "no modality"),
        (_infer(server, params={"modality": "t1"}, upload=("flat.nii.gz", flat.read_bytes())), 422, "3-D volume"),
        (_infer(server, params={"modality": "t1"}, upload=("broken.nii.gz", flair[:5000])), 422, "cannot be read"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status and reason in response.json()["detail"], response.text[:500]
    assert requests.get(f"{server}/info/").status_code == 200
