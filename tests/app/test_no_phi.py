"""No patient name, ID or birth date in anything MoME prints, logs or writes besides the DICOM SEG/SR.

A study has names, IDs and dates planted in every identifying field and in the free-text fields a technologist may
fill with them. It is segmented by the Deploy application (Python logging at DEBUG, every Python warning printed to
the console, as a plain interpreter shows them), rejected with nothing to segment, and, as NIfTI with the name in the
header's text fields, segmented by ``mome-seg``. The real stdout/stderr file descriptors (Holoscan's C++ log too),
report.json, the QC PNGs (bytes, text chunks and every caption drawn) and the NIfTI outputs are then searched.
The planted person names have no ``^``, so highdicom warns about them, quoting them.
"""

from __future__ import annotations

import gzip
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from app.app import AppOptions
from app.cli import seg_main
from app.cli.application import main as app_main
from app.cli.application import run_app
from operators.phi import Redactor

NAME, PATIENT_ID, BIRTH_DATE = "Johnathan Plantedname", "PID-PLANTED-4711", "19231105"
SEQUENCE_ID = "OPIDSEQ-PLANTED-31"  # in OtherPatientIDsSequence
# Every identifying attribute MoME reads: person names (VR PN, without a caret), IDs, dates. Each word is made up
# (no ordinary word), since the values stay registered for the rest of the test session.
IDENTIFYING = {
    "PatientName": NAME,
    "PatientID": PATIENT_ID,
    "PatientBirthDate": BIRTH_DATE,
    "OtherPatientIDs": "OPID-PLANTED-0815",
    "OtherPatientNames": "Aliasplanted Joplanted",
    "PatientBirthName": "Birthplanted Johnathan",
    "PatientMotherBirthName": "Motherplanted Mariaplanted",
    "PatientAddress": "12 Plantedway Plantville",
    "PatientTelephoneNumbers": "555-PLANTED-0199",
    "IssuerOfPatientID": "ISSUER-PLANTED",
    "MedicalRecordLocator": "MRL-PLANTED-77",
    "AccessionNumber": "ACC-PLANTED-9931",
    "ReferringPhysicianName": "Referplanted Plantdoc",
    "PerformingPhysicianName": "Performplanted Plantdoc",
    "OperatorsName": "Operplanted Plantdoc",
}
FREE_TEXT = {  # keyword -> text appended; the router still recognises the series by its description
    "SeriesDescription": NAME,
    "ProtocolName": PATIENT_ID,
    "StudyDescription": f"brain MRI of {NAME} born {BIRTH_DATE}",
    "InstitutionName": f"clinic of {NAME}",
    "ImageComments": f"{NAME} {PATIENT_ID} {BIRTH_DATE}",
}
SECRETS = sorted(
    {word for value in IDENTIFYING.values() for word in value.split() if len(word) > 2} | {SEQUENCE_ID, "1923-11-05"}
)


def test_redactor_matches_whole_tokens_in_any_case_and_spares_uids():
    redactor = Redactor()
    redactor.add(["Doe^Jo", "Doe Jo", "Doe", "Jo", "4711", "1923-11-05"])  # "Jo": too short to register
    text = "DOE, Jo: Doe^Jo doe.nii.gz Doering 4711 uid 1.2.4711.3 4711. born 1923-11-05"
    assert redactor.redact(text) == (
        "[redacted], Jo: [redacted] [redacted].nii.gz Doering [redacted] uid 1.2.4711.3 [redacted]. born [redacted]"
    )


def _leaks(data: bytes | str) -> list[str]:
    """The planted values (any case) found in ``data``."""
    text = (data.decode("latin-1") if isinstance(data, bytes) else data).lower()
    return [secret for secret in SECRETS if secret.lower() in text]


def _plant(ds: Dataset) -> None:
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    for keyword, value in FREE_TEXT.items():
        setattr(ds, keyword, f"{getattr(ds, keyword, '')} {value}".strip()[:64])
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = SEQUENCE_ID, "ISSUER-PLANTED"
    ds.OtherPatientIDsSequence = Sequence([other])


@pytest.fixture(scope="module")
def planted(study, tmp_path_factory) -> tuple[Path, str]:
    """The ``study`` fixture (FLAIR, localizer, CT) with the planted values in every instance."""
    folder, _, study_uid = study
    target = tmp_path_factory.mktemp("planted")
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        _plant(ds)
        (target / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target / path.relative_to(folder), enforce_file_format=True)
    return target, study_uid


@pytest.fixture
def warnings_shown(monkeypatch) -> None:
    """Every Python warning printed to stderr, as a plain interpreter does (pytest would only collect them)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    warnings.simplefilter("always")  # pytest restores the filters after the test


@pytest.fixture
def drawn(monkeypatch) -> list[str]:
    """Every text drawn on an image (the QC captions), in order."""
    texts: list[str] = []
    draw_text = ImageDraw.ImageDraw.text

    def text(self, xy, content, *args, **kwargs):
        texts.append(str(content))
        return draw_text(self, xy, content, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return texts


def _assert_png_clean(path: Path) -> None:
    assert not _leaks(path.read_bytes()), path
    with Image.open(path) as image:
        assert not _leaks(repr(image.info) + repr(getattr(image, "text", {}))), path


def _python_m_app(source: Path, out: Path, bundle: Path, *options: str) -> int:
    """``python -m app`` with the SDK's DEBUG log level and progress lines."""
    return app_main(["-i", str(source), "-o", str(out), "-m", str(bundle), "--device", "cpu", "-l", "DEBUG", *options])


def test_segmented_study_shows_no_phi(tmp_path, tiny_bundle, planted, warnings_shown, drawn, capfd):
    folder, study_uid = planted
    code = _python_m_app(folder, tmp_path / "out", tiny_bundle, "--modalities", "flair")
    printed = capfd.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "single component" in printed.err  # highdicom's warning about the name was shown...
    assert not _leaks(printed.out + printed.err), printed.err[-3000:]  # ...without the name
    study_dir = tmp_path / "out" / study_uid
    report = (study_dir / "report.json").read_bytes()
    assert b"AX FLAIR [redacted]" in report  # the description is kept, the name in it is not
    assert not _leaks(report)
    (png,) = study_dir.glob("qc_*.png")
    _assert_png_clean(png)
    assert drawn and not _leaks("\n".join(drawn))


def test_rejected_study_prints_no_phi(tmp_path, tiny_bundle, planted, warnings_shown, capfd):
    folder, _ = planted
    code = _python_m_app(folder, tmp_path / "out", tiny_bundle, "--modalities", "dwi")
    printed = capfd.readouterr()
    assert code == 3 and "input rejected" in printed.err and "AX FLAIR [redacted]" in printed.err, printed.err
    assert not _leaks(printed.out + printed.err), printed.err[-3000:]
    assert not (tmp_path / "out").exists()


class _QuotingSegmenter:
    """Fails as a library does that quotes a header value in its error message."""

    def describe(self) -> dict:
        return {"name": "quoting"}

    def segment(self, *args, **kwargs):
        raise ValueError(f"cannot handle a series of {NAME}")


def test_an_operator_error_quoting_a_name_is_redacted(tmp_path, tiny_bundle, planted, capfd):
    """Holoscan's C++ logger prints the message of an exception raised in an operator."""
    folder, _ = planted
    code = run_app(folder, tmp_path / "out", tiny_bundle, AppOptions(segmenter=_QuotingSegmenter()))
    printed = capfd.readouterr()
    assert code == 3 and "cannot handle a series of [redacted]" in printed.err, printed.err
    assert not _leaks(printed.out + printed.err), printed.err


def test_nifti_outputs_carry_no_header_text(tmp_path, tiny_bundle, study, warnings_shown, drawn, capfd):
    folder, _, _ = study
    source = nib.load(next((folder.parent / "nifti").rglob("*_0000.nii.gz")))
    header = source.header.copy()
    header["descrip"] = f"{NAME} {PATIENT_ID} {BIRTH_DATE}".encode()
    header["aux_file"], header["intent_name"], header["db_name"] = b"Plantedname", PATIENT_ID.encode(), b"Johnathan"
    path = tmp_path / "planted_flair.nii.gz"
    nib.save(nib.Nifti1Image(source.get_fdata(dtype="float32"), source.affine, header), path)
    out = tmp_path / "out"
    code = seg_main([str(path), "-o", str(out), "--model", str(tiny_bundle), "--device", "cpu", "--save-mni"])
    printed = capfd.readouterr()
    assert code == 0, printed.err[-3000:]
    assert not _leaks(printed.out + printed.err), printed.err[-3000:]
    written = sorted(out.glob("*.nii.gz"))
    assert len(written) == 3
    for nifti in written:
        assert not _leaks(gzip.decompress(nifti.read_bytes())), nifti
    segmentation = nib.load(out / "planted_flair_seg.nii.gz")  # the geometry is kept
    assert segmentation.shape == source.shape and np.allclose(segmentation.affine, source.affine, atol=1e-5)
    assert segmentation.header["sform_code"] == header["sform_code"] > 0
    assert segmentation.header.get_xyzt_units() == header.get_xyzt_units()
    assert not _leaks((out / "report.json").read_bytes())
    _assert_png_clean(out / "planted_flair_qc.png")
    assert drawn and not _leaks("\n".join(drawn))
