"""Bad DICOM input through the Deploy application: a reason naming the series, exit code 3, nothing written, and no
patient name or ID in anything printed."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_factory import make_series

from app.api import segment_study
from app.app import AppOptions
from app.cli.application import run_app

SHAPE = (16, 16, 10)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


class _NeverSegment:
    """Fails the test if anything reaches inference."""

    def describe(self) -> dict:
        return {"name": "never"}

    def segment(self, *args, **kwargs):
        raise AssertionError("a rejected series reached inference")


def _write(datasets, folder, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ds.save_as(folder / f"{start + index:03d}.dcm", enforce_file_format=True)


def _flair(**kwargs):
    return make_series(np.full(SHAPE, 200.0), AFFINE, description="AX FLAIR", **kwargs)


def _case(name: str, folder) -> str:
    """Writes one bad input into ``folder``; returns a fragment of the expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "empty":
        return "no DICOM image instances"
    if name == "not-dicom-only":
        (folder / "notes.txt").write_text("hello")
        (folder / "image.png").write_bytes(b"\x89PNG\r\n")
        return "no DICOM image instances"
    if name == "ct-only":
        _write(make_series(np.ones(SHAPE), AFFINE, description="HEAD CT", modality="CT"), folder)
        return "not an MR series"
    datasets = _flair()
    if name == "missing-slice":
        del datasets[4]
        reason = "irregular slice spacing"
    elif name == "duplicate-slices":  # two acquisitions at the same positions (4-D) in one series
        again = _flair()
        for ds, other in zip(datasets, again):
            other.SeriesInstanceUID, other.StudyInstanceUID = ds.SeriesInstanceUID, ds.StudyInstanceUID
            other.FrameOfReferenceUID = ds.FrameOfReferenceUID
        datasets += again
        reason = "duplicate slice positions"
    elif name == "single-slice":
        datasets = datasets[:1]
        reason = "at least 8 are needed"
    elif name == "mixed-orientation":
        datasets[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        reason = "different orientations"
    elif name == "no-pixel-data":
        del datasets[3].PixelData
        reason = "has no pixel data"
    elif name == "truncated":
        _write(datasets, folder)
        path = folder / "005.dcm"
        path.write_bytes(path.read_bytes()[:-200])
        return "cannot be"
    _write(datasets, folder)
    return reason


CASES = ["empty", "not-dicom-only", "ct-only", "missing-slice", "duplicate-slices", "single-slice"]
CASES += ["mixed-orientation", "no-pixel-data", "truncated"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_rejected_with_a_reason_and_nothing_written(tmp_path, capsys, name):
    reason = _case(name, tmp_path / "in")
    out = tmp_path / "out"
    code = run_app(tmp_path / "in", out, None, AppOptions(segmenter=_NeverSegment()), prog="mome-app")
    printed = capsys.readouterr()
    assert code == 3, printed.err
    assert "input rejected" in printed.err and reason in printed.err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in"]
    everything = printed.out + printed.err
    assert "Demo^Synthetic" not in everything and "MOME-DEMO" not in everything


def test_a_bad_series_does_not_stop_the_good_one(tmp_path, tiny_bundle, study):
    """A truncated series beside a good study is reported, and the good series is still segmented."""
    folder, _, study_uid = study
    broken = _flair(study=study_uid)
    _write(broken, tmp_path / "in" / "broken")
    path = tmp_path / "in" / "broken" / "004.dcm"
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path, enforce_file_format=True)
    for source in folder.rglob("*.dcm"):
        target = tmp_path / "in" / "good" / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    result = segment_study(tmp_path / "in", tmp_path / "out", model=tiny_bundle, all_series=True)  # raises unless 0
    (report,) = result.reports
    rejected = [e for e in report["segmented"].values() if "rejected" in e]
    assert len(rejected) == 1 and "has no pixel data" in rejected[0]["rejected"]
    assert report["summary"]["segmented_series"] == 1 and report["summary"]["rejected_series"] == 1
