"""A local Orthanc with the worker's configuration (``worker/orthanc.json``), for ``make pacs-demo``, the benchmark
and the tests: loopback HTTP, the DICOMweb plugin, the user metadata the worker writes, storage in a folder of ours.

A site runs its own Orthanc; ``worker/orthanc.json`` shows the settings the worker relies on (``UserMetadata``
``MoMEStatus`` / ``MoMEReason``, a short ``StableAge``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CONFIG", "DICOMWEB_PLUGIN", "ORTHANC", "OrthancProcess", "OrthancStartError", "free_port"]

CONFIG = Path(__file__).with_name("orthanc.json")
ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


class OrthancStartError(RuntimeError):
    """Orthanc is not installed, exited, or did not answer in time (the message ends with its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class OrthancProcess:
    """One Orthanc server on loopback ports, its storage and log under ``root``; :meth:`start` and :meth:`stop` may
    be called again (same ports, same storage: a restart).

    Args:
        root: folder for the configuration, the storage and the log.
        overrides: configuration entries over ``worker/orthanc.json`` (e.g. ``DicomModalities``, ``StableAge``).
    """

    root: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        """``worker/orthanc.json`` with this server's ports and folders (and ``overrides``)."""
        config = json.loads(CONFIG.read_text())
        config.update(
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            StorageDirectory=str(self.root / "storage"),
            IndexDirectory=str(self.root / "storage"),
        )
        config.update(self.overrides)
        return config

    def start(self, timeout_s: float = 30) -> OrthancProcess:
        """Starts Orthanc and waits until its REST API answers."""
        if ORTHANC is None or not DICOMWEB_PLUGIN.is_file():
            raise OrthancStartError("Orthanc with its DICOMweb plugin is not installed (apt orthanc orthanc-dicomweb).")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "orthanc.json").write_text(json.dumps(self.config(), indent=2))
        log = (self.root / "orthanc.log").open("a")
        self.process = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/system", timeout=2).read()
                return self
            except urllib.error.HTTPError:  # it answers (e.g. 401: authentication enabled)
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        tail = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
        raise OrthancStartError(f"Orthanc did not start on port {self.http_port}: {tail}")

    def stop(self) -> None:
        """Stops Orthanc (SIGTERM, then SIGKILL after 30 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
