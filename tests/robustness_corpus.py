"""A corpus of unusual and malformed inputs, each with the behaviour the product must show (issue 32).

Every :class:`Case` writes its input into a folder and says what a run on it must do: the exit code, a fragment of
the message (or, for inputs that are segmented, checks on the report), and for every case the invariants that hold
whatever the input: nothing written unless the exit code is 0, no staging folder left beside the output, no patient
name or ID and no raw control character on the console. ``make test`` runs the fast cases in-process
(``tests/app/test_robustness_corpus.py``); ``make bench-robustness`` runs every case through the real command line
(``bench/robustness.py``) and writes a table.

The classes are those of the 0.9.1 robustness run (``CLASSES``) plus the bad inputs tested before it (``known``).
Cases marked ``needs_model`` reach inference; the others are rejected before the model is used.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app.demo_study import series_datasets

__all__ = ["CASES", "CLASSES", "PATIENT_MARKERS", "Brain", "Case", "Expected", "check_run", "load_brain"]

CLASSES = {
    "intensity": "intensity offsets and scaling",
    "geometry": "header geometry and pixel scaling",
    "phi": "patient data on the console and in outputs",
    "duplicate-uid": "duplicate SOPInstanceUID",
    "limits": "unbounded work (archives, declared matrices)",
    "signal": "SIGTERM / SIGINT",
    "log-injection": "control characters in header text",
    "fallback": "a broken preferred series beside a valid one",
    "output-folder": "unusable or reused output folders",
    "known": "bad input covered before issue 32",
}
PATIENT_MARKERS = ("Demo^Synthetic", "MOME-DEMO", "Planted Patientname", "PLANTED-ID-4711", "Plantedname")
SMALL_SHAPE = (16, 16, 10)
SMALL_AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


@dataclass(frozen=True)
class Brain:
    """A native FLAIR (volume, RAS affine) on real anatomy, the source of the cases that are segmented."""

    volume: np.ndarray
    affine: np.ndarray


def load_brain(folder: Path) -> Brain:
    """A synthetic native FLAIR with a glioma (the bundle's generator, MNI152 anatomy, 2 mm), cached in ``folder``."""
    import nibabel as nib

    from scripts.synthetic import generate_dataset

    dataset = folder / "dataset.json"
    if not dataset.is_file():
        generate_dataset(folder, 1, seed=5, spacing=2.0, modalities=["flair"], lesion_weights={"glioma": 1.0},
                         native=True)  # fmt: skip
    image = nib.load(folder / json.loads(dataset.read_text())["training"][0]["image"])
    return Brain(np.asarray(image.dataobj, dtype=np.float32), image.affine)


@dataclass
class Expected:
    """What a run on a case must do. ``input`` is what to pass as ``-i``; ``out`` overrides the output folder."""

    input: Path
    exit_code: int
    message: str | None = None  # regex searched in the console output
    report_checks: list[Callable[[dict[str, Any]], str | None]] = field(default_factory=list)  # each: problem or None
    out: Path | None = None
    signal: str | None = None  # "SIGTERM" / "SIGINT": the command-line runner stops the run mid-study


@dataclass(frozen=True)
class Case:
    """One unusual input. ``build(folder, brain)`` writes it under ``folder`` and returns the expectation."""

    name: str
    issue_class: str
    build: Callable[[Path, Brain | None], Expected]
    needs_model: bool = False
    command_line_only: bool = False  # needs a real process (signals)


def _write(datasets: list[Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ds.save_as(folder / f"{index:03d}.dcm", enforce_file_format=True)
    return folder


def _small(description: str = "AX FLAIR", modality: str = "MR", **extra: Any) -> list[Dataset]:
    return series_datasets(np.full(SMALL_SHAPE, 200.0), SMALL_AFFINE, 5, description, modality=modality, extra=extra)


def _flair(brain: Brain, number: int = 5, study: str | None = None, **extra: Any) -> list[Dataset]:
    extra = {"RepetitionTime": 9000, "EchoTime": 110, "InversionTime": 2500, **extra}
    return series_datasets(brain.volume, brain.affine, number, "AX T2 FLAIR", study, extra=extra)


def _rejected(folder: Path, datasets: list[Dataset], message: str) -> Expected:
    return Expected(_write(datasets, folder / "in"), 3, message)


def _edit(datasets: list[Dataset], index: int | None = None, **values: Any) -> list[Dataset]:
    for ds in datasets if index is None else [datasets[index]]:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return datasets


# ---- known classes (tested before issue 32) -----------------------------------------------------------------------


def _empty(folder: Path, brain: Brain | None) -> Expected:
    (folder / "in").mkdir(parents=True)
    return Expected(folder / "in", 3, "no DICOM image instances")


def _not_dicom(folder: Path, brain: Brain | None) -> Expected:
    (folder / "in").mkdir(parents=True)
    (folder / "in" / "notes.txt").write_text("hello")
    return Expected(folder / "in", 3, "no DICOM image instances")


def _ct_only(folder: Path, brain: Brain | None) -> Expected:
    return _rejected(folder, _small("HEAD CT", "CT"), "not an MR series")


def _missing_slice(folder: Path, brain: Brain | None) -> Expected:
    datasets = _small()
    del datasets[4]
    return _rejected(folder, datasets, "irregular slice spacing")


def _single_slice(folder: Path, brain: Brain | None) -> Expected:
    return _rejected(folder, _small()[:1], "at least 8 are needed")


def _no_pixels(folder: Path, brain: Brain | None) -> Expected:
    datasets = _small()
    del datasets[3].PixelData
    return _rejected(folder, datasets, "has no pixel data")


def _truncated(folder: Path, brain: Brain | None) -> Expected:
    path = _write(_small(), folder / "in") / "005.dcm"
    path.write_bytes(path.read_bytes()[:-200])
    return Expected(folder / "in", 3, "cannot be")


# ---- geometry and scaling -----------------------------------------------------------------------------------------


def _iop_half_length(folder: Path, brain: Brain | None) -> Expected:
    datasets = _edit(_small(), ImageOrientationPatient=[0.5, 0, 0, 0, 1, 0])
    return _rejected(folder, datasets, "ImageOrientationPatient vectors are not unit length")


def _iop_slightly_long(folder: Path, brain: Brain) -> Expected:
    datasets = _flair(brain)
    for ds in datasets:
        ds.ImageOrientationPatient = [round(float(v) * 1.004, 8) for v in ds.ImageOrientationPatient]
    return Expected(_write(datasets, folder / "in"), 0, report_checks=[_reports_correction])


def _iop_non_orthogonal(folder: Path, brain: Brain | None) -> Expected:
    datasets = _edit(_small(), ImageOrientationPatient=[1, 0, 0, 0.5, float(np.sqrt(0.75)), 0])
    return _rejected(folder, datasets, "not orthogonal")


def _gantry_tilt(folder: Path, brain: Brain | None) -> Expected:
    affine = SMALL_AFFINE.copy()
    affine[1, 2] = 3.0 * np.tan(np.deg2rad(12.0))
    datasets = series_datasets(np.full(SMALL_SHAPE, 200.0), affine, 5, "AX FLAIR")
    return _rejected(folder, datasets, "not stacked along their normal")


def _ipp_nan(folder: Path, brain: Brain | None) -> Expected:
    return _rejected(folder, _edit(_small(), 2, ImagePositionPatient=[float("nan"), 0, 0]), "non-finite")


def _slope_zero(folder: Path, brain: Brain | None) -> Expected:
    return _rejected(folder, _edit(_small(), RescaleSlope=0, RescaleIntercept=0), "RescaleSlope is 0")


def _spacing_zero(folder: Path, brain: Brain | None) -> Expected:
    return _rejected(folder, _edit(_small(), PixelSpacing=[0, 1.5]), "PixelSpacing .* not positive")


def _duplicate_uid(folder: Path, brain: Brain | None) -> Expected:
    datasets = _small()
    datasets[6].SOPInstanceUID = datasets[1].SOPInstanceUID
    return _rejected(folder, datasets, "SOPInstanceUID\\(s\\) occur more than once")


# ---- intensity ----------------------------------------------------------------------------------------------------


def _intercept(folder: Path, brain: Brain) -> Expected:
    datasets = _edit(_flair(brain), RescaleIntercept=-1000, RescaleSlope=1)
    return Expected(_write(datasets, folder / "in"), 0, report_checks=[_lesion_inside_brain])


def _wide_offset(folder: Path, brain: Brain) -> Expected:
    datasets = _flair(brain)
    for ds in datasets:
        stored = np.frombuffer(ds.PixelData, np.uint16).astype(np.int64) * 3 + 2**31 - 9000
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
        ds.PixelData = stored.astype(np.uint32).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = -(2**31), 1
    return Expected(_write(datasets, folder / "in"), 0, report_checks=[_lesion_inside_brain])


def _lesion_inside_brain(report: dict[str, Any]) -> str | None:
    """The series was segmented with a registration that passed its checks (0.9.1: brain Dice 0.00, SEG written)."""
    entries = [e for e in report["segmented"].values() if "seg" in e]
    if not entries:
        return "nothing was segmented"
    registration = entries[0]["registration"]
    if registration["brain_dice"] is not None and registration["brain_dice"] < 0.8:
        return f"brain Dice {registration['brain_dice']:.2f}"
    return None


def _reports_correction(report: dict[str, Any]) -> str | None:
    entries = [e for e in report["segmented"].values() if "seg" in e]
    if not entries or not entries[0].get("geometry_corrections"):
        return "the orientation correction is not in the report"
    return None


# ---- patient data, log injection ----------------------------------------------------------------------------------


def _planted(datasets: list[Dataset]) -> list[Dataset]:
    """A name without a caret (highdicom warns about it, quoting it) and IDs in every identifying field."""
    return _edit(
        datasets, PatientName="Planted Patientname", PatientID="PLANTED-ID-4711", OtherPatientIDs="PLANTED-ID-4711",
        AccessionNumber="PLANTED-ID-4711", StudyDescription="Planted Patientname brain",
        ImageComments="Planted Patientname",
    )  # fmt: skip


def _phi_rejected(folder: Path, brain: Brain | None) -> Expected:
    datasets = _planted(_small("Planted Patientname HEAD CT", "CT"))
    return _rejected(folder, datasets, "not an MR series")


def _phi_segmented(folder: Path, brain: Brain) -> Expected:
    return Expected(_write(_planted(_flair(brain)), folder / "in"), 0, report_checks=[_no_markers_in_report])


def _no_markers_in_report(report: dict[str, Any]) -> str | None:
    text = json.dumps(report)
    found = [marker for marker in PATIENT_MARKERS if marker in text]
    return f"patient data in report.json: {found}" if found else None


def _log_injection(folder: Path, brain: Brain | None) -> Expected:
    datasets = _small("HEAD CT\r\n[  0.0 s] forged: all clear\x1b[2J", "CT")
    return _rejected(folder, datasets, r"HEAD CT\\x0d\\x0a")


# ---- limits -------------------------------------------------------------------------------------------------------


def _zip_bomb(folder: Path, brain: Brain | None) -> Expected:
    archive = folder / "bomb.zip"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        with out.open("zeros.dcm", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(64):
                member.write(chunk)
    return Expected(archive, 3, "max_archive_ratio")


def _declared_huge_matrix(folder: Path, brain: Brain | None) -> Expected:
    datasets = _edit(_small(), Rows=12000, Columns=12000)
    return _rejected(folder, datasets, "max_matrix")


# ---- fallback, output folder, signals -----------------------------------------------------------------------------


def _fallback(folder: Path, brain: Brain) -> Expected:
    study = generate_uid()
    preferred = _flair(brain, number=5, study=study)  # 3D: preferred over the 2D series below
    for ds in preferred:
        ds.MRAcquisitionType = "3D"
    del preferred[10]  # a missing slice: fails its checks
    backup = _flair(brain, number=9, study=study)
    _write(preferred, folder / "in" / "preferred")
    _write(backup, folder / "in" / "backup")
    broken, kept = preferred[0].SeriesInstanceUID, backup[0].SeriesInstanceUID

    def fell_back(report: dict[str, Any]) -> str | None:
        entry = report["segmented"].get(broken, {})
        if "irregular slice spacing" not in entry.get("rejected", "") or entry.get("fallback_series") != kept:
            return f"the broken series' entry does not say why it was skipped: {entry}"
        return None if "seg" in report["segmented"].get(kept, {}) else "the valid series was not segmented"

    return Expected(folder / "in", 0, report_checks=[fell_back])


def _output_is_a_file(folder: Path, brain: Brain | None) -> Expected:
    _write(_small(), folder / "in")
    (folder / "taken").write_text("a file where the output folder should go")
    return Expected(folder / "in", 2, "taken", out=folder / "taken")


def _stopped(signal_name: str) -> Callable[[Path, Brain], Expected]:
    def build(folder: Path, brain: Brain) -> Expected:
        code = 143 if signal_name == "SIGTERM" else 130
        return Expected(_write(_flair(brain), folder / "in"), code, f"stopped by {signal_name}", signal=signal_name)

    return build


CASES = [
    Case("empty-folder", "known", _empty),
    Case("not-dicom-only", "known", _not_dicom),
    Case("ct-only", "known", _ct_only),
    Case("missing-slice", "known", _missing_slice),
    Case("single-slice", "known", _single_slice),
    Case("no-pixel-data", "known", _no_pixels),
    Case("truncated-file", "known", _truncated),
    Case("iop-half-length", "geometry", _iop_half_length),
    Case("iop-0.4%-long", "geometry", _iop_slightly_long, needs_model=True),
    Case("iop-60-degrees", "geometry", _iop_non_orthogonal),
    Case("gantry-tilt-12-degrees", "geometry", _gantry_tilt),
    Case("ipp-nan", "geometry", _ipp_nan),
    Case("rescale-slope-0", "geometry", _slope_zero),
    Case("pixel-spacing-0", "geometry", _spacing_zero),
    Case("duplicate-sop-uid", "duplicate-uid", _duplicate_uid),
    Case("rescale-intercept-1000", "intensity", _intercept, needs_model=True),
    Case("uint32-offset-2^31", "intensity", _wide_offset, needs_model=True),
    Case("phi-in-rejected-study", "phi", _phi_rejected),
    Case("phi-in-segmented-study", "phi", _phi_segmented, needs_model=True),
    Case("crlf-esc-in-description", "log-injection", _log_injection),
    Case("zip-bomb-64MiB", "limits", _zip_bomb),
    Case("declared-12000-matrix", "limits", _declared_huge_matrix),
    Case("broken-preferred-series", "fallback", _fallback, needs_model=True),
    Case("output-is-a-file", "output-folder", _output_is_a_file),
    Case("sigterm-mid-study", "signal", _stopped("SIGTERM"), needs_model=True, command_line_only=True),
    Case("sigint-mid-study", "signal", _stopped("SIGINT"), needs_model=True, command_line_only=True),
]


def check_run(expected: Expected, code: int, console: str, out: Path) -> list[str]:
    """Problems with a finished run (empty: it behaved). ``console`` is everything it printed."""
    problems = []
    if code != expected.exit_code:
        problems.append(f"exit code {code}, expected {expected.exit_code}")
    if expected.message and not re.search(expected.message, console):
        problems.append(f"no message matching {expected.message!r}")
    leaked = [marker for marker in PATIENT_MARKERS if marker in console]
    if leaked:
        problems.append(f"patient data on the console: {leaked}")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", console):
        problems.append("a raw control character on the console")
    staging = list(out.parent.glob(f".{out.name}.mome-*")) if out.parent.exists() else []
    if staging:
        problems.append(f"staging left behind: {[p.name for p in staging]}")
    if code != 0:
        if out.exists() and out.is_dir() and any(out.iterdir()) and expected.out is None:
            problems.append("output written although the run failed")
        return problems
    reports = sorted(out.glob("*/report.json"))
    if not reports:
        return [*problems, "no report.json written"]
    report = json.loads(reports[0].read_text())
    problems += [problem for check in expected.report_checks if (problem := check(report))]
    return problems
