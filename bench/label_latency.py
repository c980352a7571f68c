"""MONAI Label latency: a real ``monailabel start_server --app label`` (``.venv-label``) on loopback, timed over HTTP.

Per task, one first request and then ``--repeats`` timed ``POST /infer/<task>?image=...&output=json`` requests
with the shipped demo weights on CPU: ``mome`` on the demo study's native FLAIR (100 x 123 x 41, oblique, 2 mm in
plane) and ``mome_plus`` on its glioma as one co-registered 4-channel image (80 x 98 x 80, 2 mm). Then, where Orthanc
is installed, the same on a DICOMweb datastore: the demo study stored in a real Orthanc on loopback, ``mome`` on its
FLAIR series and ``mome_plus`` on its T1ce series (with the study's T1, T2, FLAIR); there the first request also
downloads and converts the series. Reported: the first request's and the median client-side seconds (what a 3D
Slicer user waits), the server's own stage seconds of the last run, the server start time, and the machine.

Usage (repository root, after ``make label``)::

    .venv/bin/python bench/label_latency.py [--repeats 3]

Writes ``bench/results/label_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # the tests' real-server helpers (Orthanc, MONAI Label)
sys.path.insert(0, str(REPO / "tests" / "label"))
sys.path.insert(0, str(REPO))

from cpu_profiles import machine_facts  # noqa: E402
from label_client import infer, label_and_record, label_server  # noqa: E402
from publish import publish  # noqa: E402
from servers import ORTHANC_MISSING, running_orthanc  # noqa: E402

from scripts.synthetic import PLUS_MODALITIES, generate_dataset  # noqa: E402

SEED = 7  # the demo study's


BRATS_REGIONS = {"whole": (1, 2, 3), "core": (1, 3), "enhancing": (3,), "oedema": (2,), "necrotic": (1,)}


def dice_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of the lesion (binary truth), or of each BraTS region (truth with labels 1-3)."""
    regions = BRATS_REGIONS if truth.max() > 1 else {"lesion": (1, 2, 3)}
    scores = {}
    for region, values in regions.items():
        prediction, expected = np.isin(labels, values), np.isin(truth, values)
        scores[region] = round(2 * float((prediction & expected).sum()) / max(1, prediction.sum() + expected.sum()), 3)
    return scores


def make_studies(root: Path) -> Path:
    """The demo study's FLAIR and its glioma's four contrasts as one 4-channel image, in a studies folder; their
    truths in ``root/truth``."""
    studies, truth = root / "studies", root / "truth"
    studies.mkdir(parents=True)
    truth.mkdir()
    made = generate_dataset(
        root / "flair", 1, seed=SEED, spacing=2.0, modalities=["flair"], lesion_weights={"glioma": 1.0}, native=True
    )
    (entry,) = json.loads(made.read_text())["training"]
    (root / "flair" / entry["image"]).rename(studies / "demo_flair.nii.gz")
    (root / "flair" / entry["label"]).rename(truth / "demo_flair.nii.gz")
    made = generate_dataset(
        root / "glioma", 1, seed=SEED, spacing=2.0, modalities=list(PLUS_MODALITIES), lesion_weights={"glioma": 1.0},
        multichannel=True, label_scheme="brats",
    )  # fmt: skip
    (entry,) = json.loads(made.read_text())["training"]
    channels = [nib.load(root / "glioma" / image) for image in entry["image"]]
    stacked = np.stack([np.asarray(c.dataobj, np.float32) for c in channels], axis=-1)
    nib.save(nib.Nifti1Image(stacked, channels[0].affine), studies / "demo_glioma.nii.gz")
    (root / "glioma" / entry["label"]).rename(truth / "demo_glioma.nii.gz")
    return studies


def time_task(url: str, task: str, image: str, repeats: int, truth: Path, shown: str = "") -> dict[str, Any]:
    """A first request, then ``repeats`` timed ones; the last one's result record and its Dice against ``truth``
    (``shown``: the image's name in the table)."""
    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            label, record = label_and_record(infer(url, image, model=task), Path(folder))
            seconds.append(time.perf_counter() - started)
        labels = np.asarray(label.dataobj)
    first, seconds = seconds[0], seconds[1:]
    return {
        "task": task,
        "image": shown or image,
        "first_s": round(first, 2),
        "seconds": [round(s, 2) for s in seconds],
        "median_s": round(statistics.median(seconds), 2),
        "server_stage_s": record["seconds"],
        "lesion_volume_ml": record["lesion_volume_ml"],
        "dice": dice_scores(labels, np.asarray(nib.load(truth).dataobj)),
    }


def time_dicomweb(root: Path, repeats: int) -> list[dict[str, Any]]:
    """The demo study in a real Orthanc, a server on it: ``mome`` on the FLAIR series, ``mome_plus`` on the T1ce."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from app.demo_study import make_demo_study

    study = make_demo_study(root / "demo")
    (root / "orthanc").mkdir()
    with running_orthanc(root / "orthanc") as orthanc:
        files = sorted((root / "demo" / "dicom").rglob("*.dcm"))
        DICOMwebClient(url=str(orthanc["dicomweb"])).store_instances([pydicom.dcmread(path) for path in files])
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")}
        with label_server(str(orthanc["dicomweb"]), root, env) as url:
            rows = []
            for task, modality in (("mome", "flair"), ("mome_plus", "t1ce")):
                series = study["series"][modality]
                truth = root / "demo" / "nifti" / series["label"]
                timed = time_task(url, task, series["series_uid"], repeats, truth, f"{modality} series")
                rows.append({"datastore": "DICOMweb", **timed})
            return rows


def write_markdown(results: dict[str, Any], path: Path) -> None:
    machine = results["machine"]
    lines = [
        "# MONAI Label latency (CPU, demo weights)",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, ISA {', '.join(machine['isa_flags'])}, "
        f"torch {machine['torch']}. Server start (process to first `/info/` answer): {results['server_start_s']} s.",
        "",
        "| datastore | task | image | first request s | median s (of 3, client side) | runs | registration s | "
        "network s | Dice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["tasks"]:
        stages = row["server_stage_s"]
        lines.append(
            f"| {row['datastore']} | {row['task']} | {row['image']} | {row['first_s']} | {row['median_s']} | "
            f"{', '.join(map(str, row['seconds']))} | {stages.get('registration', '-')} | "
            f"{stages.get('network', '-')} | {', '.join(f'{k} {v}' for k, v in row['dice'].items())} |"
        )
    lines += [
        "",
        "First request: the folder's includes the network's first run in the process (kernel selection); the "
        "DICOMweb one also the series' download, checks and NIfTI conversion (mome_plus: the study's four series). "
        "The demo study gives each series its own FrameOfReferenceUID, so MoME+ on a PACS study registers T1, T2 and "
        "FLAIR to T1ce (the `coregistration` stage); series of one session sharing a frame of reference are only "
        "resampled. The 4-channel image of the folder datastore is co-registered already.",
    ]
    if results.get("dicomweb_skipped"):
        lines += ["", f"DICOMweb datastore not measured: {results['dicomweb_skipped']}."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mome-label-bench-") as folder:
        studies = make_studies(Path(folder))
        truths = Path(folder) / "truth"
        started = time.perf_counter()
        with label_server(str(studies), Path(folder)) as url:
            start_s = time.perf_counter() - started
            tasks = [
                {"datastore": "folder", **time_task(url, task, image, args.repeats, truths / f"{image}.nii.gz")}
                for task, image in (("mome", "demo_flair"), ("mome_plus", "demo_glioma"))
            ]
        results = {"machine": machine_facts(), "server_start_s": round(start_s, 1), "tasks": tasks}
        if ORTHANC_MISSING:
            results["dicomweb_skipped"] = "Orthanc with its DICOMweb plugin is not installed"
        else:
            tasks += time_dicomweb(Path(folder) / "dicomweb", args.repeats)
    publish("label_latency", results, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
