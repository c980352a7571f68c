"""DICOM study in -> modality routing -> MoME (native-space pipeline) -> DICOM-SEG + report, without Holoscan.

``mome-seg DICOM_DIR_OR_ZIP -o OUT`` runs this; the Deploy application's operators wrap the same functions. Per study
(``OUT/<StudyInstanceUID>/``): one ``seg_<SeriesInstanceUID>.dcm`` per segmented series and ``report.json`` with the
routing decision and reason for every series, and per segmented series the modality, lesion volume/count, largest
lesion, registration quality, timings and the SEG's UIDs. Patient identifiers are never written to logs or reports.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from operators.dicom_series import SeriesRejected, series_to_volume
from operators.modality_router import MODALITIES, SeriesHeader, choose, classify, load_rules
from operators.qc_image import qc_caption, save_qc_png
from operators.seg_writer import build_seg
from operators.study_loader import dicom_root, scan_studies

__all__ = ["NothingToSegment", "run_dicom"]


class NothingToSegment(ValueError):
    """No series of the input could be segmented; the message lists why."""


def _segment_series(files: Sequence[Path], modality: str, segmenter: Any, study_dir: Path, say) -> dict[str, Any]:
    from scripts.metrics import lesion_summary

    started = time.perf_counter()
    volume = series_to_volume([pydicom.dcmread(f) for f in files])
    load_seconds = time.perf_counter() - started
    result = segmenter.segment(volume.array, volume.affine, name=f"series {volume.series_uid}", modality=modality,
                               progress=say)  # fmt: skip
    started = time.perf_counter()
    meta = segmenter.describe()
    seg = build_seg(volume, result.labels, str(meta.get("name") or "MoME"), str(meta.get("version") or "unknown"))
    path = study_dir / f"seg_{volume.series_uid}.dcm"
    seg.save_as(path)
    seg_seconds = time.perf_counter() - started
    registration = result.registration.to_dict()
    lesions = lesion_summary(result.labels, abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0)
    series_number = getattr(volume.instances[0], "SeriesNumber", "?")
    caption = qc_caption(f"{modality} series {series_number}", lesions, meta)
    qc = save_qc_png(volume.array, result.labels, volume.affine, study_dir / f"qc_{volume.series_uid}.png", caption)
    return {
        "modality": modality,
        "shape": list(volume.array.shape),
        **lesions,
        "qc_png": qc.name,
        "registration": registration,
        "warnings": registration["warnings"],
        "seg": {"file": path.name, "sop_instance_uid": str(seg.SOPInstanceUID),
                "series_instance_uid": str(seg.SeriesInstanceUID), "frames": int(seg.NumberOfFrames)},
        "seconds": {"dicom_load": round(load_seconds, 2), **{k: round(v, 2) for k, v in result.seconds.items()},
                    "seg_write": round(seg_seconds, 2)},
    }  # fmt: skip


def run_dicom(
    source: Path,
    out: Path,
    segmenter: Any,
    modalities: Sequence[str] = MODALITIES,
    all_series: bool = False,
    rules_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Segments every study under ``source`` (folder or zip); returns the study reports (also written as JSON).

    Raises:
        NothingToSegment: no DICOM study, or no series that the router accepts and that converts to a volume.
    """
    say = progress or (lambda _: None)
    rules = load_rules(rules_file)
    reports = []
    with dicom_root(source) as root, tempfile.TemporaryDirectory(prefix="mome-out-") as staging:
        found = scan_studies(root)
        if not found.studies:
            raise NothingToSegment(f"{source}: no DICOM image instances found ({found.skipped_files} other files).")
        for study_uid, series in sorted(found.studies.items()):
            routed, decisions = [], []
            for entry in series.values():
                header = SeriesHeader.from_dataset(entry.header, n_instances=len(entry.files))
                decision = classify(header, rules)
                routed.append((header, decision))
                decisions.append({**decision.to_dict(), "instances": len(entry.files)})
            study_dir = Path(staging) / study_uid
            study_dir.mkdir()
            segmented: dict[str, dict[str, Any]] = {}
            for modality, headers in sorted(choose(routed, modalities, all_series).items()):
                for header in headers:
                    say(f"study {study_uid}: {modality} series {header.series_uid}")
                    files = series[header.series_uid].files
                    try:
                        segmented[header.series_uid] = _segment_series(files, modality, segmenter, study_dir, say)
                    except SeriesRejected as error:
                        segmented[header.series_uid] = {"modality": modality, "rejected": str(error)}
            done = {uid: v for uid, v in segmented.items() if "seg" in v}
            report = {
                "study_instance_uid": study_uid,
                "model": segmenter.describe(),
                "series": decisions,
                "segmented": segmented,
                "summary": {
                    "segmented_series": len(done),
                    "lesion_volume_ml": {v["modality"]: v["lesion_volume_ml"] for v in done.values()},
                },
                "skipped_non_dicom_files": found.skipped_files,
            }
            (study_dir / "report.json").write_text(json.dumps(report, indent=2))
            reports.append(report)
        if not any(r["summary"]["segmented_series"] for r in reports):
            reasons = "; ".join(
                f"{d['description'] or d['series_uid']}: {d['reason']}" for r in reports for d in r["series"]
            )
            rejected = "; ".join(s["rejected"] for r in reports for s in r["segmented"].values() if "rejected" in s)
            raise NothingToSegment(f"{source}: no series could be segmented ({rejected or reasons}).")
        out.mkdir(parents=True, exist_ok=True)
        for report in reports:  # only now, so a rejected input leaves nothing behind
            target = out / report["study_instance_uid"]
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(Path(staging) / report["study_instance_uid"]), target)
    return reports
