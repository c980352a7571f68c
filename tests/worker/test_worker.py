"""``mome-worker`` against a real Orthanc on loopback: studies arrive by C-STORE, results go back, nothing is lost or
stored twice across SIGTERM, SIGKILL and an Orthanc restart.

Orthanc runs with the worker's configuration (``worker/orthanc.json``, StableAge 2 s) and forwards results to a real
DICOM receiver (a pynetdicom C-STORE SCP). Skipped where Orthanc is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from dicom_factory import DCIODVFY, dciodvfy_errors, make_series
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from servers import ORTHANC_MISSING

from worker.stack import OrthancProcess, free_port

pytestmark = pytest.mark.skipif(ORTHANC_MISSING, reason="Orthanc with its DICOMweb plugin is not installed")

MOME_WORKER = Path(sys.executable).with_name("mome-worker")
WAIT_S = 420
PATIENTS = [(f"Testpatient^Person{k}", f"PID{k}X7Q3") for k in range(8)]  # must never reach a log


def _wait_for(check: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Receiver:
    """A DICOM C-STORE SCP (pynetdicom) on loopback: the site's archive the worker forwards to."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.received: list[str] = []
        self.delay_s = 0.0  # a slow archive: the worker is still forwarding when the test kills it
        ae = AE(ae_title="ARCHIVE")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        time.sleep(self.delay_s)
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000


class WorkerProcess:
    """``mome-worker`` as a service process, with its state folder."""

    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir, self.env = state_dir, env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with (self.state_dir.parent / "worker.stderr").open("a") as log:
            command = [str(MOME_WORKER), "--state-dir", str(self.state_dir)]
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        _wait_for(lambda: (self.state_dir / "journal.sqlite").is_file(), "the worker's journal", 60)

    def status(self) -> dict:
        answer = subprocess.run(
            [str(MOME_WORKER), "status", "--state-dir", str(self.state_dir)], capture_output=True, text=True
        )
        assert answer.returncode == 0, answer.stderr
        return json.loads(answer.stdout)

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        code = self.process.wait(timeout=120)
        self.process = None
        return code


def _worker_env(orthanc: OrthancProcess, **settings: str) -> dict[str, str]:
    """The worker's environment: this Orthanc, the feed read twice a second, and ``settings``."""
    return {**os.environ, "MOME_ORTHANC_URL": orthanc.url, "MOME_WORKER_POLL_SECONDS": "0.5", **settings}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Orthanc (forwarding to a receiver) and a running worker, both on loopback."""
    root = tmp_path_factory.mktemp("pacs")
    receiver = Receiver()
    overrides = {"StableAge": 2, "DicomModalities": {"archive": ["ARCHIVE", "127.0.0.1", receiver.port]}}
    orthanc = OrthancProcess(root / "orthanc", overrides).start()
    env = _worker_env(orthanc, MOME_WORKER_FORWARD_TO="archive", MOME_WORKER_RETRY_SECONDS="2")
    worker = WorkerProcess(root / "state", env)
    worker.start()
    try:
        yield {"orthanc": orthanc, "worker": worker, "receiver": receiver, "root": root}
    finally:
        if worker.process is not None:
            worker.signal(signal.SIGTERM)
        orthanc.stop()
        receiver.server.shutdown()


@pytest.fixture(scope="module")
def flair_volume(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """A small native-space synthetic FLAIR with a lesion."""
    from scripts.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("flair")
    made = generate_dataset(
        root, 1, seed=11, spacing=2.0, modalities=["flair"], lesion_weights={"glioma": 1.0}, native=True
    )
    (entry,) = json.loads(made.read_text())["training"]
    image = nib.load(root / entry["image"])
    return np.asarray(image.dataobj, np.float32), image.affine


def _study(volume: np.ndarray, affine: np.ndarray, patient: int, modality: str = "MR") -> list[pydicom.Dataset]:
    description = "AX T2 FLAIR" if modality == "MR" else "HEAD CT"
    datasets = make_series(volume, affine, 3, description, generate_uid(), modality)
    for ds in datasets:
        ds.PatientName, ds.PatientID = PATIENTS[patient]
    return datasets


def _c_store(port: int, datasets: list[pydicom.Dataset]) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    ae = AE(ae_title="SCANNER")
    for sop_class in (MRImageStorage, CTImageStorage):
        ae.add_requested_context(sop_class)
    association = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert association.is_established
    try:
        assert {int(association.send_c_store(ds).Status) for ds in datasets} == {0}
    finally:
        association.release()


def _orthanc_study(orthanc: OrthancProcess, study_uid: str, auth: tuple[str, str] | None = None) -> str | None:
    found = requests.post(f"{orthanc.url}/tools/lookup", data=study_uid, auth=auth).json()
    return next((item["ID"] for item in found if item["Type"] == "Study"), None)


def _metadata(orthanc: OrthancProcess, study_uid: str, auth: tuple[str, str] | None = None) -> dict[str, str]:
    study = _orthanc_study(orthanc, study_uid, auth)
    if study is None:
        return {}
    return requests.get(f"{orthanc.url}/studies/{study}/metadata", params={"expand": ""}, auth=auth).json()


def _outcome(orthanc: OrthancProcess, study_uid: str) -> str | None:
    return _metadata(orthanc, study_uid).get("MoMEStatus")


def _series_by_modality(orthanc: OrthancProcess, study_uid: str) -> dict[str, list[dict]]:
    study = _orthanc_study(orthanc, study_uid)
    found: dict[str, list[dict]] = {}
    for series in requests.get(f"{orthanc.url}/studies/{study}/series", params={"expand": ""}).json():
        found.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return found


def _instance(orthanc: OrthancProcess, series: dict) -> pydicom.Dataset:
    (instance,) = series["Instances"]
    content = requests.get(f"{orthanc.url}/instances/{instance}/file").content
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(content))


def test_the_demo_study_is_segmented_and_its_results_stored_and_forwarded(stack, tmp_path):
    from app.demo_study import make_demo_study

    orthanc, receiver = stack["orthanc"], stack["receiver"]
    demo = make_demo_study(tmp_path)
    files = sorted((tmp_path / "dicom").rglob("*.dcm"))
    _c_store(orthanc.dicom_port, [pydicom.dcmread(path) for path in files])
    _wait_for(lambda: _outcome(orthanc, demo["study_uid"]), "the demo study's outcome")
    assert _outcome(orthanc, demo["study_uid"]) == "mome-done"

    found = _series_by_modality(orthanc, demo["study_uid"])
    assert len(found["SEG"]) == len(found["SR"]) == len(found["OT"]) == 2  # DWI (MoME) and T1ce (MoME+)
    sources = {modality: info["series_uid"] for modality, info in demo["series"].items()}
    segs = [_instance(orthanc, series) for series in found["SEG"]]
    assert {seg.ReferencedSeriesSequence[0].SeriesInstanceUID for seg in segs} == {sources["dwi"], sources["t1ce"]}
    positions = {str(ds.SOPInstanceUID): ds.ImagePositionPatient for ds in map(pydicom.dcmread, files)}
    for seg in segs:
        for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on the slice it refers to
            source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            np.testing.assert_allclose(
                [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                [float(v) for v in positions[str(source)]],
                atol=1e-3,
            )
    captures = [_instance(orthanc, series) for series in found["OT"]]
    for capture in captures:  # the QC images: RGB Secondary Captures in the study
        assert capture.SOPClassUID == SecondaryCaptureImageStorage and capture.StudyInstanceUID == demo["study_uid"]
        assert capture.pixel_array.ndim == 3 and capture.pixel_array.shape[2] == 3
    if DCIODVFY:
        for kind, dataset in (("SEG", segs[0]), ("OT", captures[0])):
            path = tmp_path / f"{kind}.dcm"
            dataset.save_as(path)
            assert dciodvfy_errors(path) == [], kind
    stored = {str(_instance(orthanc, s).SOPInstanceUID) for kind in ("SEG", "SR", "OT") for s in found[kind]}
    _wait_for(lambda: stored <= set(receiver.received), "the forwarded results", 60)
    status = stack["worker"].status()
    assert status["jobs"].get("done", 0) >= 1 and status["last_success"] and status["queue"] == 0


def test_a_ct_only_study_is_rejected_with_the_reason_and_nothing_stored(stack):
    orthanc = stack["orthanc"]
    datasets = _study(np.full((32, 32, 12), 40.0), np.diag([1.0, 1.0, 2.0, 1.0]), patient=1, modality="CT")
    _c_store(orthanc.dicom_port, datasets)
    study_uid = str(datasets[0].StudyInstanceUID)
    _wait_for(lambda: _outcome(orthanc, study_uid), "the CT study's outcome")
    metadata = _metadata(orthanc, study_uid)
    assert metadata["MoMEStatus"] == "mome-rejected" and "CT" in metadata["MoMEReason"], metadata
    assert metadata["MoMEReason"].startswith("no series could be segmented"), metadata  # no worker paths in it
    assert set(_series_by_modality(orthanc, study_uid)) == {"CT"}


def test_sigterm_then_sigkill_during_a_study_still_leaves_exactly_one_result(stack, flair_volume):
    orthanc, worker = stack["orthanc"], stack["worker"]
    datasets = _study(*flair_volume, patient=2)
    study_uid = str(datasets[0].StudyInstanceUID)
    _c_store(orthanc.dicom_port, datasets)

    _wait_for(lambda: worker.status()["running"], "the study to start")
    time.sleep(2)
    assert worker.signal(signal.SIGTERM) == 143  # abandoned cleanly: back in the queue, nothing stored
    assert worker.status()["queue"] == 1 and set(_series_by_modality(orthanc, study_uid)) == {"MR"}

    worker.start()
    _wait_for(lambda: worker.status()["running"], "the study to start again")
    time.sleep(4)
    assert worker.signal(signal.SIGKILL) == -signal.SIGKILL
    worker.start()  # the killed job is redone
    _wait_for(lambda: _outcome(orthanc, study_uid), "the study's outcome after the restarts")
    found = _series_by_modality(orthanc, study_uid)
    assert {kind: len(found[kind]) for kind in ("SEG", "SR", "OT")} == {"SEG": 1, "SR": 1, "OT": 1}
    assert all(len(series["Instances"]) == 1 for kind in ("SEG", "SR", "OT") for series in found[kind])


def test_a_kill_after_the_results_were_stored_still_leaves_exactly_one_result(stack, flair_volume):
    """Killed between storing the results and recording the outcome (while forwarding to a slow archive), the worker
    redoes the study on restart: it deletes what the interrupted attempt stored first."""
    orthanc, worker, receiver = stack["orthanc"], stack["worker"], stack["receiver"]
    datasets = _study(*flair_volume, patient=6)
    study_uid = str(datasets[0].StudyInstanceUID)
    receiver.delay_s = 5.0
    try:
        _c_store(orthanc.dicom_port, datasets)
        _wait_for(lambda: "SEG" in _series_by_modality(orthanc, study_uid), "the first attempt's SEG")
        assert _outcome(orthanc, study_uid) is None
        assert worker.signal(signal.SIGKILL) == -signal.SIGKILL
    finally:
        receiver.delay_s = 0.0
    first = {s["MainDicomTags"]["SeriesInstanceUID"] for s in _series_by_modality(orthanc, study_uid)["SEG"]}
    worker.start()
    _wait_for(lambda: _outcome(orthanc, study_uid), "the study's outcome after the restart")
    found = _series_by_modality(orthanc, study_uid)
    assert {kind: len(found[kind]) for kind in ("SEG", "SR", "OT")} == {"SEG": 1, "SR": 1, "OT": 1}
    redone = {s["MainDicomTags"]["SeriesInstanceUID"] for s in found["SEG"]}
    assert redone.isdisjoint(first)  # the redo's SEG, not the first attempt's


def test_a_series_added_after_processing_makes_a_new_result_that_replaces_the_old(stack, flair_volume):
    orthanc = stack["orthanc"]
    datasets = _study(*flair_volume, patient=7)
    study_uid = str(datasets[0].StudyInstanceUID)
    _c_store(orthanc.dicom_port, datasets)
    _wait_for(lambda: _outcome(orthanc, study_uid), "the first version's outcome")
    (old,) = [s["MainDicomTags"]["SeriesInstanceUID"] for s in _series_by_modality(orthanc, study_uid)["SEG"]]

    added = make_series(flair_volume[0], flair_volume[1], 9, "AX T2 FLAIR 3D", study_uid)  # a later series
    for ds in added:
        ds.PatientName, ds.PatientID = PATIENTS[7]
    _c_store(orthanc.dicom_port, added)

    def replaced() -> bool:
        segs = [s["MainDicomTags"]["SeriesInstanceUID"] for s in _series_by_modality(orthanc, study_uid).get("SEG", [])]
        return len(segs) == 1 and segs[0] != old and _outcome(orthanc, study_uid) == "mome-done"

    _wait_for(replaced, "the second version's result in place of the first")
    found = _series_by_modality(orthanc, study_uid)
    assert {kind: len(found[kind]) for kind in ("SEG", "SR", "OT")} == {"SEG": 1, "SR": 1, "OT": 1}
    assert len(found["MR"]) == 2


def test_a_study_that_keeps_failing_is_retried_then_marked_failed_and_the_worker_goes_on(tmp_path, flair_volume):
    """A worker whose application cannot run (here: an unknown profile) retries with backoff, then records the
    reason on the study and in its status; it keeps serving. This Orthanc requires HTTP basic auth."""
    auth = ("mome", "s3cret-Pa55")
    overrides = {"StableAge": 1, "AuthenticationEnabled": True, "RegisteredUsers": {auth[0]: auth[1]}}
    with OrthancProcess(tmp_path / "orthanc", overrides) as orthanc:
        assert requests.get(f"{orthanc.url}/system").status_code == 401
        env = _worker_env(
            orthanc,
            MOME_ORTHANC_USER=auth[0],
            MOME_ORTHANC_PASSWORD=auth[1],
            MOME_WORKER_MAX_ATTEMPTS="2",
            MOME_WORKER_RETRY_SECONDS="1",
            MOME_WORKER_APP_ARGS="--profile no-such-profile",
        )
        worker = WorkerProcess(tmp_path / "state", env)
        worker.start()
        try:
            datasets = _study(*flair_volume, patient=0)
            _c_store(orthanc.dicom_port, datasets)
            study_uid = str(datasets[0].StudyInstanceUID)
            _wait_for(lambda: _metadata(orthanc, study_uid, auth).get("MoMEStatus"), "the failing study's outcome", 300)
            metadata = _metadata(orthanc, study_uid, auth)
            assert metadata["MoMEStatus"] == "mome-failed" and "no-such-profile" in metadata["MoMEReason"], metadata
            status = worker.status()
            assert status["jobs"] == {"failed": 1} and status["failures"][0]["study_uid"] == study_uid
            assert worker.process is not None and worker.process.poll() is None  # still serving
        finally:
            assert worker.signal(signal.SIGTERM) == 143


def test_a_study_that_arrives_while_the_worker_is_down_is_processed_when_it_is_back(stack, flair_volume):
    orthanc, worker = stack["orthanc"], stack["worker"]
    assert worker.signal(signal.SIGTERM) == 143
    datasets = _study(*flair_volume, patient=5)
    _c_store(orthanc.dicom_port, datasets)
    time.sleep(4)  # stable before the worker is back: only the change feed remembers it
    worker.start()
    _wait_for(lambda: _outcome(orthanc, str(datasets[0].StudyInstanceUID)), "the study sent while the worker was down")
    assert _outcome(orthanc, str(datasets[0].StudyInstanceUID)) == "mome-done"


def test_the_worker_waits_out_an_orthanc_restart(stack, flair_volume):
    orthanc, worker = stack["orthanc"], stack["worker"]
    orthanc.stop()
    time.sleep(3)  # the worker finds Orthanc gone and waits
    orthanc.start()
    assert worker.process is not None and worker.process.poll() is None
    datasets = _study(*flair_volume, patient=3)
    _c_store(orthanc.dicom_port, datasets)
    _wait_for(lambda: _outcome(orthanc, str(datasets[0].StudyInstanceUID)), "the study after Orthanc's restart")
    assert _outcome(orthanc, str(datasets[0].StudyInstanceUID)) == "mome-done"


def test_five_studies_sent_back_to_back_are_processed_in_arrival_order(stack, flair_volume):
    orthanc = stack["orthanc"]
    studies = [_study(*flair_volume, patient=4 + k % 4) for k in range(5)]
    for datasets in studies:
        _c_store(orthanc.dicom_port, datasets)
        time.sleep(0.2)
    uids = [str(datasets[0].StudyInstanceUID) for datasets in studies]
    _wait_for(lambda: all(_outcome(orthanc, uid) for uid in uids), "the five studies", WAIT_S * 2)
    assert [_outcome(orthanc, uid) for uid in uids] == ["mome-done"] * 5
    journal = json.loads(
        subprocess.run(
            [sys.executable, "-c", _JOURNAL_QUERY, str(stack["root"] / "state" / "journal.sqlite")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    order = [row[0] for row in journal if row[0] in uids]
    assert order == uids  # queued and started in the order they arrived
    started = [row[1] for row in journal if row[0] in uids]
    assert started == sorted(started)


_JOURNAL_QUERY = """
import json, sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute("SELECT study_uid, started FROM jobs ORDER BY id").fetchall()
print(json.dumps(rows))
"""


def test_no_log_carries_a_patient_name_or_id(stack):
    logs = [stack["root"] / "worker.stderr", stack["root"] / "state" / "worker.log"]
    logs += sorted((stack["root"] / "state" / "logs").glob("*.log"))
    text = "\n".join(path.read_text(errors="replace") for path in logs)
    assert "study done" in text
    for name, patient_id in [*PATIENTS, ("Demo^Synthetic", "MOME-DEMO")]:
        for value in (name, name.replace("^", " "), name.split("^")[1], patient_id):
            assert value not in text, value


def test_settings_come_from_the_environment_or_a_file_never_the_command_line(tmp_path):
    answer = subprocess.run(
        [str(MOME_WORKER), "--state-dir", str(tmp_path), "--orthanc-password", "secret"], capture_output=True, text=True
    )
    assert answer.returncode == 2 and "unrecognized arguments" in answer.stderr
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"orthanc_url": "ftp://pacs"}))
    answer = subprocess.run(
        [str(MOME_WORKER), "--state-dir", str(tmp_path), "--config", str(config)], capture_output=True, text=True
    )
    assert answer.returncode == 2 and "orthanc_url 'ftp://pacs'" in answer.stderr
