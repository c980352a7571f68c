"""Starting the MoME MONAI Label app on loopback and talking to it over HTTP, as 3D Slicer and OHIF do."""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
from servers import running_server

from worker.stack import free_port

REPO = Path(__file__).resolve().parents[2]
LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"


@contextmanager
def label_server(studies: str, workdir: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``monailabel start_server --app label`` on ``studies`` (a folder or a DICOMweb URL); yields its URL.

    It runs in the MONAI Label environment (``make label``); without it the test fails, it never skips.
    """
    assert LABEL_PYTHON.is_file(), f"{LABEL_PYTHON}: no MONAI Label environment; run `make label`"
    port = free_port()
    command = [str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(REPO / "label")]
    command += ["--studies", studies, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--conf", "bundle", str(REPO / "bundle"), "--conf", "device", "cpu"]
    command += ["--conf", "model_dir", str(workdir / "models")]
    environment = {**os.environ, "MONAI_LABEL_SESSIONS": "false", "PYTHONPATH": "", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    with running_server(command, f"{url}/info/", workdir / "server.log", timeout_s=240, env=environment, cwd=workdir):
        yield url


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction > 0, truth > 0
    return 2 * float((prediction & truth).sum()) / max(1, int(prediction.sum() + truth.sum()))


def infer(
    server: str, image: str = "", params: dict | None = None, upload: tuple[str, bytes] | None = None, model="mome"
) -> requests.Response:
    """``POST /infer/{model}`` on a datastore image or an uploaded file, answer as label image + record."""
    files = {"file": upload} if upload else None
    data = {"params": json.dumps(params or {})}
    return requests.post(f"{server}/infer/{model}", params={"image": image, "output": "all"}, data=data, files=files)


def label_and_record(response: requests.Response, tmp_path: Path) -> tuple[nib.Nifti1Image, dict]:
    """The label image and the result record of a multipart ``output=all`` answer."""
    assert response.status_code == 200, response.text[:2000]
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    record = json.loads(parts["params"].get_content())
    path = tmp_path / "label.nii.gz"
    path.write_bytes(parts["image"].get_payload(decode=True))
    return nib.load(path), record
