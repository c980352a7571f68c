"""``make pacs-demo``: a PACS node and its AI worker on this machine, the demo study sent as a scanner sends it.

Starts Orthanc (``worker/orthanc.json`` on free loopback ports) and ``mome-worker``, sends the demo study by C-STORE
(pynetdicom), waits until the worker records the outcome on the study, prints where the SEG, SR and QC image are
(Orthanc Explorer and DICOMweb URLs) and how long it took, then stops both. ``--keep`` leaves them running until
Ctrl-C, to look at the results in a browser. ``--repeats N`` sends N copies of the demo study (new UIDs, same pixels)
one after the other and ``--json FILE`` writes each one's times (``bench/pacs_latency.py`` uses both).

Usage: ``python -m worker.demo [--workdir DIR] [--keep] [--repeats N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import requests

from app.demo_study import make_demo_study
from operators.bundle import use_bundle_scripts
from worker.orthanc import REASON_METADATA, STATUS_METADATA
from worker.stack import OrthancProcess, OrthancStartError

TIMEOUT_S = 900


def send_study(port: int, files: list[Path]) -> None:
    """C-STORE of ``files`` to Orthanc's DICOM port, as a scanner sends a study."""
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="MOMEDEMO")
    ae.requested_contexts = StoragePresentationContexts
    association = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    if not association.is_established:
        raise RuntimeError(f"Orthanc's DICOM port {port} refused the association.")
    try:
        failed = [path.name for path in files if association.send_c_store(pydicom.dcmread(path)).Status != 0]
    finally:
        association.release()
    if failed:
        raise RuntimeError(f"C-STORE failed for {len(failed)} file(s), e.g. {failed[0]}.")


def wait_for_outcome(url: str, study_uid: str, worker: subprocess.Popen, sent: float) -> dict[str, Any]:
    """The study's MoME metadata once the worker recorded an outcome, with the seconds from ``sent`` until the first
    SEG was in Orthanc (``first_seg_s``) and until the outcome (``done_s``)."""
    deadline, first_seg = time.monotonic() + TIMEOUT_S, None
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"mome-worker exited with {worker.returncode}.")
        found = requests.post(f"{url}/tools/lookup", data=study_uid, timeout=10).json()
        study = next((item["ID"] for item in found if item["Type"] == "Study"), None)
        if study is not None:
            if first_seg is None:
                series = requests.get(f"{url}/studies/{study}/series", params={"expand": ""}, timeout=10).json()
                if any(item["MainDicomTags"].get("Modality") == "SEG" for item in series):
                    first_seg = time.monotonic() - sent
            metadata = requests.get(f"{url}/studies/{study}/metadata", params={"expand": ""}, timeout=10).json()
            if metadata.get(STATUS_METADATA):
                done = time.monotonic() - sent
                times = {"first_seg_s": round(first_seg or done, 1), "done_s": round(done, 1)}
                return {"study": study, **metadata, **times}
        time.sleep(0.2)
    raise TimeoutError(f"no outcome after {TIMEOUT_S} s.")


def show(orthanc: OrthancProcess, outcome: dict[str, Any]) -> None:
    """Where the results are."""
    study = outcome["study"]
    print(f"\nOutcome: {outcome[STATUS_METADATA]} {outcome.get(REASON_METADATA, '')}".rstrip())
    print(f"From the last C-STORE: first SEG in Orthanc {outcome['first_seg_s']} s, study done {outcome['done_s']} s")
    series = requests.get(f"{orthanc.url}/studies/{study}/series", params={"expand": ""}, timeout=10).json()
    study_uid = requests.get(f"{orthanc.url}/studies/{study}", timeout=10).json()["MainDicomTags"]["StudyInstanceUID"]
    for item in series:
        tags = item["MainDicomTags"]
        if tags.get("Modality") in ("SEG", "SR", "OT"):
            uid = tags["SeriesInstanceUID"]
            print(f"  {tags['Modality']:3s} {tags.get('SeriesDescription', '')}")
            print(f"      {orthanc.dicomweb}/studies/{study_uid}/series/{uid}")
    print(f"Orthanc Explorer: {orthanc.url}/app/explorer.html#study?uuid={study}")


def _send_and_wait(orthanc: OrthancProcess, worker: subprocess.Popen, folder: Path) -> dict[str, Any]:
    """A fresh copy of the demo study sent by C-STORE; its outcome and times."""
    study = make_demo_study(folder)
    files = sorted((folder / "dicom").rglob("*.dcm"))
    print(f"Sending the demo study ({len(files)} instances) by C-STORE ...")
    send_study(orthanc.dicom_port, files)
    outcome = wait_for_outcome(orthanc.url, study["study_uid"], worker, time.monotonic())
    show(orthanc, outcome)
    return {"instances": len(files), **{k: outcome[k] for k in ("first_seg_s", "done_s", STATUS_METADATA)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make pacs-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".pacs-demo"))
    parser.add_argument("--keep", action="store_true", help="keep Orthanc and the worker running until Ctrl-C")
    parser.add_argument("--repeats", type=int, default=1, help="copies of the demo study sent one after the other")
    parser.add_argument("--json", type=Path, help="write each copy's times and outcome here")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    use_bundle_scripts()  # the demo study comes from the bundle's generator
    orthanc = OrthancProcess(workdir / "orthanc")
    try:
        orthanc.start()
    except OrthancStartError as error:
        print(f"make pacs-demo: {error}", file=sys.stderr)
        return 2
    worker = None
    try:
        env = {**os.environ, "MOME_ORTHANC_URL": orthanc.url, "MOME_WORKER_POLL_SECONDS": "1"}
        command = [str(Path(sys.executable).with_name("mome-worker")), "--state-dir", str(workdir / "worker")]
        with (workdir / "worker.log").open("w") as log:
            worker = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        print(f"Orthanc on {orthanc.url} (DICOM port {orthanc.dicom_port}); mome-worker log: {workdir / 'worker.log'}")
        time.sleep(3)  # the worker takes the feed's position
        runs = [_send_and_wait(orthanc, worker, workdir / f"study{index + 1}") for index in range(args.repeats)]
        if args.json:
            args.json.write_text(json.dumps({"stable_age_s": orthanc.config()["StableAge"], "runs": runs}, indent=2))
        if args.keep:
            print("Running until Ctrl-C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=120)
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
