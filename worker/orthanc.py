"""The Orthanc REST API as the worker uses it (``requests``: TLS, basic auth).

Only what the worker needs: the change feed, a study's series, a ZIP of chosen series, storing and deleting instances,
sending them to a DICOM modality, and the study's MoME status (user metadata ``MoMEStatus`` / ``MoMEReason``, declared
in Orthanc's ``UserMetadata``; on Orthanc 1.12 and later also the labels ``mome-done`` / ``mome-rejected`` /
``mome-failed``). A server that cannot be reached, or answers 5xx, raises :class:`OrthancUnavailable`: the worker
waits and tries again, it never gives a study up for that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from worker.settings import WorkerSettings

__all__ = ["MOME_MANUFACTURER", "STATUSES", "Change", "Orthanc", "OrthancError", "OrthancUnavailable", "SeriesInfo"]

logger = logging.getLogger(__name__)
MOME_MANUFACTURER = "MoME open-source project"  # the Manufacturer of every object MoME writes (SEG, SR, QC image)
STATUSES = ("mome-done", "mome-rejected", "mome-failed")
STATUS_METADATA, REASON_METADATA = "MoMEStatus", "MoMEReason"
TIMEOUT_S = (10, 300)  # connect, read
LABELS_SINCE = (1, 12)


class OrthancUnavailable(ConnectionError):
    """Orthanc cannot be reached or answered a server error: try again later."""


class OrthancError(RuntimeError):
    """Orthanc refused a request (4xx): the message says which and why."""


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change feed."""

    seq: int
    change_type: str
    resource_type: str
    resource_id: str


@dataclass(frozen=True)
class SeriesInfo:
    """A series of a study as Orthanc indexes it."""

    orthanc_id: str
    series_uid: str
    modality: str
    manufacturer: str
    instances: int

    @property
    def written_by_mome(self) -> bool:
        return self.manufacturer == MOME_MANUFACTURER


class Orthanc:
    """A client of one Orthanc server (settings: URL, credentials, TLS)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.url = settings.orthanc_url.rstrip("/")
        self.session = requests.Session()
        self.session.auth = settings.auth
        self.session.verify = settings.verify
        self._labels: bool | None = None

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, f"{self.url}{path}", timeout=TIMEOUT_S, **kwargs)
        except requests.RequestException as error:
            raise OrthancUnavailable(f"Orthanc at {self.url}: {type(error).__name__}") from None
        if response.status_code >= 500:
            raise OrthancUnavailable(f"Orthanc at {self.url}: {method} {path} answered {response.status_code}")
        if response.status_code >= 400:
            message = _message(response)
            raise OrthancError(f"Orthanc {method} {path}: {response.status_code} {message}")
        return response

    def system(self) -> dict[str, Any]:
        return self._request("GET", "/system").json()

    def changes(self, since: int, limit: int = 100) -> tuple[list[Change], int, bool]:
        """Changes after ``since``: the changes, the last sequence number and whether the feed is exhausted."""
        answer = self._request("GET", "/changes", params={"since": since, "limit": limit}).json()
        changes = [Change(c["Seq"], c["ChangeType"], c["ResourceType"], c["ID"]) for c in answer["Changes"]]
        return changes, int(answer["Last"]), bool(answer["Done"])

    def last_change(self) -> int:
        """The sequence number of the newest change."""
        return int(self._request("GET", "/changes", params={"last": ""}).json()["Last"])

    def study_uid(self, study: str) -> str:
        return str(self._request("GET", f"/studies/{study}").json()["MainDicomTags"]["StudyInstanceUID"])

    def series(self, study: str) -> list[SeriesInfo]:
        """The study's series (with their instance counts)."""
        answer = self._request("GET", f"/studies/{study}/series", params={"expand": ""}).json()
        return [
            SeriesInfo(
                orthanc_id=item["ID"],
                series_uid=str(item["MainDicomTags"].get("SeriesInstanceUID", "")),
                modality=str(item["MainDicomTags"].get("Modality", "")),
                manufacturer=str(item["MainDicomTags"].get("Manufacturer", "")),
                instances=len(item["Instances"]),
            )
            for item in answer
        ]

    def download_archive(self, series: Sequence[str], target: Path) -> None:
        """A ZIP of the ``series`` (Orthanc IDs) written to ``target``."""
        body = {"Resources": list(series), "Synchronous": True}
        with self._request("POST", "/tools/create-archive", json=body, stream=True) as response:
            with target.open("wb") as sink:
                for chunk in response.iter_content(1 << 20):
                    sink.write(chunk)

    def store(self, path: Path) -> str:
        """Stores one DICOM file; returns its Orthanc ID (the same file stored again is ``AlreadyStored``)."""
        answer = self._request("POST", "/instances", data=path.read_bytes()).json()
        return str(answer["ID"])

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc ID of an instance, by SOPInstanceUID; None when Orthanc does not hold it."""
        found = self._request("POST", "/tools/lookup", data=sop_instance_uid).json()
        return next((str(item["ID"]) for item in found if item.get("Type") == "Instance"), None)

    def delete_instances(self, sop_instance_uids: Iterable[str]) -> int:
        """Deletes the instances Orthanc holds among ``sop_instance_uids``; returns how many it deleted."""
        deleted = 0
        for uid in sop_instance_uids:
            found = self.find_instance(uid)
            if found is not None:
                self._request("DELETE", f"/instances/{found}")
                deleted += 1
        return deleted

    def send_to_modality(self, modality: str, instances: Sequence[str]) -> None:
        """C-STORE of ``instances`` (Orthanc IDs) to a DICOM modality of Orthanc's ``DicomModalities``."""
        self._request("POST", f"/modalities/{modality}/store", json={"Resources": list(instances), "Synchronous": True})

    def set_status(self, study: str, status: str, reason: str = "") -> None:
        """Records the outcome on the study: metadata (and labels where Orthanc has them)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: not one of {STATUSES}.")
        self._request("PUT", f"/studies/{study}/metadata/{STATUS_METADATA}", data=status)
        self._request("PUT", f"/studies/{study}/metadata/{REASON_METADATA}", data=reason[:1000])
        if self._has_labels():
            for label in STATUSES:
                if label != status:
                    self._request("DELETE", f"/studies/{study}/labels/{label}")
            self._request("PUT", f"/studies/{study}/labels/{status}", data="")

    def _has_labels(self) -> bool:
        if self._labels is None:
            version = str(self.system().get("Version", "0"))
            numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
            self._labels = version == "mainline" or numbers >= LABELS_SINCE
        return self._labels


def _message(response: requests.Response) -> str:
    try:
        answer = response.json()
    except ValueError:
        return response.text[:200]
    return str(answer.get("Message") or answer.get("OrthancError") or "")[:200]
