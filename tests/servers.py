"""Real servers for the tests, started on loopback ports and stopped afterwards (Orthanc, MONAI Label)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from worker.stack import DICOMWEB_PLUGIN, ORTHANC, OrthancProcess

ORTHANC_MISSING = ORTHANC is None or not DICOMWEB_PLUGIN.is_file()  # Debian orthanc + orthanc-dicomweb (.ci/run)


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
    """A real Orthanc (Debian package) with the worker's configuration on loopback ports, its storage under ``root``.

    Yields ``url`` (REST), ``dicomweb`` (``url/dicom-web``) and ``dicom_port`` (DICOM, AE title ORTHANC).
    """
    with OrthancProcess(root) as orthanc:
        yield {"url": orthanc.url, "dicomweb": orthanc.dicomweb, "dicom_port": orthanc.dicom_port}
