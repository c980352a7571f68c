"""Real servers for the tests, started on loopback ports and stopped afterwards (Orthanc, MONAI Label)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_MISSING = ORTHANC is None or not DICOMWEB_PLUGIN.is_file()  # Debian orthanc + orthanc-dicomweb (.ci/run)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    command: Sequence[str],
    ready_url: str,
    log_path: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Starts ``command``, waits until ``ready_url`` answers, yields the process and stops it at the end.

    Fails the test (with the end of the server's log) when the process exits or does not answer in ``timeout_s``.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            _wait_until_ready(process, ready_url, log_path, timeout_s)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"{Path(process.args[0]).name} exited ({process.returncode}): {_tail(log_path)}")
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s: {_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


@contextmanager
def running_orthanc(root: Path) -> Iterator[dict[str, object]]:
    """A real Orthanc (Debian package) with its DICOMweb plugin on loopback ports, its storage under ``root``.

    Yields ``url`` (REST), ``dicomweb`` (``url/dicom-web``) and ``dicom_port`` (DICOM, AE title ORTHANC).
    """
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "mome-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "config.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{http_port}"
    with running_server([ORTHANC or "Orthanc", str(root / "config.json")], f"{url}/system", root / "orthanc.log", 20):
        yield {"url": url, "dicomweb": f"{url}/dicom-web", "dicom_port": dicom_port}
