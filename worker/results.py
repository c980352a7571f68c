"""What one application run wrote, as the DICOM objects the worker stores: the SEGs and SRs, and each QC image as a
Secondary Capture a PACS viewer shows next to them.

The application writes ``OUT/<StudyInstanceUID>/`` with ``report.json``, ``seg_<series>.dcm``, ``sr_<series>.dcm`` and
``qc_<series>.png`` (:mod:`operators.output_folder`). The QC image becomes a Secondary Capture Image (highdicom) in
the SEG's study, with its patient and study modules, in a series of its own (the SEG's series number + 2000). Its
panels are in radiological display (rows toward the patient's left, columns toward posterior in the axial panel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image

from operators.phi import register_dataset
from worker.orthanc import MOME_MANUFACTURER

__all__ = ["RunResults", "collect"]

QC_SERIES_OFFSET = 2000
RADIOLOGICAL_AXIAL = ("L", "P")


@dataclass
class RunResults:
    """The files to store for one study, and what its report says."""

    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The journal's record of the run: segmented series, lesion volumes, the objects stored."""
        segmented = self.report.get("segmented", {})
        return {
            "segmented_series": {
                uid: {
                    key: entry.get(key)
                    for key in ("modality", "lesion_volume_ml", "lesion_count", "region_volume_ml")
                    if key in entry
                }
                for uid, entry in segmented.items()
            },
            "objects": len(self.files),
        }


def collect(output: Path) -> RunResults:
    """The SEGs, SRs and QC captures of the one study in ``output`` (QC PNGs converted next to them).

    Raises:
        ValueError: ``output`` does not hold exactly one study report.
    """
    reports = sorted(output.glob("*/report.json"))
    if len(reports) != 1:
        raise ValueError(f"{output}: expected one study report, found {len(reports)}.")
    study_dir = reports[0].parent
    results = RunResults(json.loads(reports[0].read_text()))
    for seg_path in sorted(study_dir.glob("seg_*.dcm")):
        series_uid = seg_path.stem[len("seg_") :]
        paths = [seg_path, study_dir / f"sr_{series_uid}.dcm"]
        qc = study_dir / f"qc_{series_uid}.png"
        if qc.is_file():
            paths.append(_qc_capture(qc, seg_path, study_dir / f"qc_{series_uid}.dcm"))
        for path in paths:
            if path.is_file():
                results.files.append(path)
                results.sop_instance_uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return results


def _qc_capture(png: Path, seg_path: Path, target: Path) -> Path:
    """The QC image as a Secondary Capture in the SEG's study (module docstring)."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    register_dataset(seg)  # its patient module: never in a log line
    pixels = np.asarray(Image.open(png).convert("RGB"))
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=seg,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=hd.UID(),
        series_number=int(seg.SeriesNumber) + QC_SERIES_OFFSET,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MOME_MANUFACTURER,
        patient_orientation=RADIOLOGICAL_AXIAL,
    )
    capture.BodyPartExamined = "HEAD"
    capture.SeriesDescription = "MoME QC image - research use, not for diagnosis"
    capture.save_as(target)
    return target
