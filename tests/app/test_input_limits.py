"""Bounded work for every input: archive and series limits are checked before extraction and before pixel decoding.

Each limit is tested on both sides (at the limit passes, one over is refused), the refusals through the application
exit 3 with the limit and its variable named, write nothing and leave no extraction folder behind.
"""

from __future__ import annotations

import io
import re
import stat
import tempfile
import zipfile
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from dicom_factory import make_series

from app.app import AppOptions
from app.cli.application import run_app
from operators.dicom_series import SeriesRejected
from operators.limits import InputLimits, LimitExceeded, LimitSettingError, SeriesLimitExceeded, env_var
from operators.modality_router import load_rules
from operators.mome_inference import segment_study
from operators.study import route_study
from operators.study_loader import copy_at_most, dicom_root, read_pixels

SHAPE = (16, 16, 10)  # columns, rows, slices
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
ARCHIVE_LIMITS = ("max_archive_members", "max_archive_bytes", "max_archive_ratio")
SERIES_LIMITS = {"max_matrix": 16, "max_slices": 10, "max_series_voxels": 16 * 16 * 10}  # what SHAPE declares


class _NeverSegment:
    """Fails the test if anything reaches inference."""

    def describe(self) -> dict:
        return {"name": "never"}

    def segment(self, *args, **kwargs):
        raise AssertionError("a refused input reached inference")


class _EmptySegment:
    """Segments nothing, instantly (for the stages before writing)."""

    def describe(self) -> dict:
        return {"name": "empty"}

    def segment(self, array, *args, **kwargs):
        return SimpleNamespace(labels=np.zeros(array.shape, np.uint8), seconds={})


@pytest.fixture(autouse=True)
def _default_limits(monkeypatch) -> None:
    """The defaults, whatever MOME_MAX_* the environment running the tests sets."""
    for limit in fields(InputLimits):
        monkeypatch.delenv(env_var(limit.name), raising=False)


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    """A temporary folder of this test's own, so that leftover extraction folders can be seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert Path(tempfile.gettempdir()) == folder
    return folder


def _extractions(temp_root: Path) -> list[Path]:
    return list(temp_root.glob("mome-dicom-*"))


def _series_files(folder: Path, **header) -> list[Path]:
    """A FLAIR series of ``SHAPE`` written into ``folder``; ``header`` values are set on every instance."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(make_series(np.full(SHAPE, 200.0), AFFINE, description="AX FLAIR")):
        for keyword, value in header.items():
            setattr(ds, keyword, value)
        paths.append(folder / f"{index:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _zip_of(paths: list[Path], archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("study/", b"")  # a folder entry: skipped
        for path in paths:
            zipped.write(path, f"study/{path.name}")
    return archive


def _measured(archive: Path) -> dict[str, int | float]:
    """What each archive limit sees in ``archive``."""
    members = zipfile.ZipFile(archive).infolist()
    total = sum(member.file_size for member in members)
    return {
        "max_archive_members": len(members),
        "max_archive_bytes": total,
        "max_archive_ratio": total / archive.stat().st_size,
    }


def _just_over(value: int | float) -> int | float:
    """The largest limit that ``value`` exceeds."""
    return value * 0.999 if isinstance(value, float) else value - 1


def _patch_member(archive: Path, **fields_at: tuple[int, int, int]) -> None:
    """Overwrites little-endian fields of the one member's local and central headers: name -> (local offset,
    central offset, value); used to craft archives whose declarations lie."""
    data = bytearray(archive.read_bytes())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    for local_offset, central_offset, value in fields_at.values():
        size = 2 if local_offset in (6, 8) else 4
        data[local + local_offset : local + local_offset + size] = value.to_bytes(size, "little")
        data[central + central_offset : central + central_offset + size] = value.to_bytes(size, "little")
    archive.write_bytes(bytes(data))


def _one_member_zip(archive: Path, content: bytes, name: str = "a.dcm") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr(name, content)
    return archive


# --- settings -------------------------------------------------------------------------------------------------------


def test_defaults_and_every_environment_variable(monkeypatch):
    assert InputLimits.from_env() == InputLimits()
    assert InputLimits().max_archive_bytes == 2 * 1024**3 and InputLimits().max_series_voxels == 2**27
    overrides = {env_var(limit.name): "7" for limit in fields(InputLimits)}
    assert {env_var(name) for name in (*ARCHIVE_LIMITS, *SERIES_LIMITS)} == set(overrides)
    assert set(overrides) == {
        "MOME_MAX_ARCHIVE_MEMBERS", "MOME_MAX_ARCHIVE_BYTES", "MOME_MAX_ARCHIVE_RATIO",
        "MOME_MAX_MATRIX", "MOME_MAX_SLICES", "MOME_MAX_SERIES_VOXELS",
    }  # fmt: skip
    assert InputLimits.from_env(overrides) == InputLimits(7, 7, 7.0, 7, 7, 7)
    monkeypatch.setenv("MOME_MAX_MATRIX", " 1_024 ")
    monkeypatch.setenv("MOME_MAX_ARCHIVE_RATIO", "12.5")
    assert InputLimits.from_env() == InputLimits(max_matrix=1024, max_archive_ratio=12.5)


@pytest.mark.parametrize(
    "variable, text",
    [("MOME_MAX_MATRIX", "big"), ("MOME_MAX_MATRIX", "0"), ("MOME_MAX_SLICES", "-5"), ("MOME_MAX_SLICES", "1.5"),
     ("MOME_MAX_ARCHIVE_RATIO", "nan"), ("MOME_MAX_ARCHIVE_RATIO", "inf"), ("MOME_MAX_ARCHIVE_BYTES", "2 GiB")],
)  # fmt: skip
def test_a_bad_setting_is_a_clear_error(variable, text):
    with pytest.raises(LimitSettingError, match=re.escape(f"{variable}={text!r}: expected a positive")):
        InputLimits.from_env({variable: text})


def test_explicit_limits_are_checked_too():
    with pytest.raises(LimitSettingError, match="max_matrix = 0"):
        InputLimits(max_matrix=0)


def test_a_bad_setting_exits_2_through_the_application(tmp_path, monkeypatch, capsys):
    _series_files(tmp_path / "in")
    monkeypatch.setenv("MOME_MAX_SERIES_VOXELS", "many")
    code = run_app(tmp_path / "in", tmp_path / "out", None, AppOptions(segmenter=_NeverSegment()), prog="mome-app")
    printed = capsys.readouterr()
    assert code == 2, printed.err
    assert "MOME_MAX_SERIES_VOXELS='many': expected a positive integer" in printed.err
    assert not (tmp_path / "out").exists()


# --- archives -------------------------------------------------------------------------------------------------------


def test_the_message_names_input_limit_variable_value_and_limit():
    error = LimitExceeded("in.zip", "max_archive_ratio", 1234.56, 1000.0)
    assert str(error) == (
        "in.zip: the compression ratio (uncompressed / archive size) is 1234.6, over the limit of 1000.0 "
        "(max_archive_ratio; set MOME_MAX_ARCHIVE_RATIO to change it)."
    )
    assert isinstance(error, ValueError) and not isinstance(error, SeriesRejected)


@pytest.mark.parametrize("limit", ARCHIVE_LIMITS)
def test_an_archive_at_a_limit_is_extracted_and_one_over_is_refused(tmp_path, temp_root, limit):
    paths = _series_files(tmp_path / "series")
    archive = _zip_of(paths, tmp_path / "study.zip")
    found = _measured(archive)[limit]
    with dicom_root(archive, InputLimits(**{limit: found})) as root:
        assert root.parent == temp_root.resolve()
        assert sorted(p.name for p in (root / "study").iterdir()) == [p.name for p in paths]
        assert all((root / "study" / p.name).read_bytes() == p.read_bytes() for p in paths)
    assert _extractions(temp_root) == []
    with pytest.raises(LimitExceeded) as refused, dicom_root(archive, InputLimits(**{limit: _just_over(found)})):
        pytest.fail("an archive over a limit was extracted")
    assert refused.value.limit == limit and refused.value.found == found and str(archive) in str(refused.value)
    assert _extractions(temp_root) == []


@pytest.mark.parametrize("limit", ARCHIVE_LIMITS)
def test_an_archive_over_a_limit_exits_3_naming_it(tmp_path, temp_root, capsys, limit):
    archive = _zip_of(_series_files(tmp_path / "series"), tmp_path / "study.zip")
    found = _measured(archive)[limit]
    options = AppOptions(segmenter=_NeverSegment(), limits=InputLimits(**{limit: _just_over(found)}))
    code = run_app(archive, tmp_path / "out", None, options, prog="mome-app")
    printed = capsys.readouterr()
    assert code == 3, printed.err
    assert "input rejected" in printed.err and limit in printed.err and env_var(limit) in printed.err
    assert not (tmp_path / "out").exists() and _extractions(temp_root) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series", "study.zip", "tmp"]  # no staging left either


def test_a_zip_bomb_is_refused_by_the_default_ratio_before_extraction(tmp_path, temp_root, capsys):
    """64 MiB of zeros in a 64 KB zip: the default ratio limit refuses it through the application."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped, zipped.open("zeros.dcm", "w") as member:
        for _ in range(64):
            member.write(bytes(1 << 20))
    assert archive.stat().st_size < 100_000
    code = run_app(archive, tmp_path / "out", None, AppOptions(segmenter=_NeverSegment()), prog="mome-app")
    printed = capsys.readouterr()
    assert code == 3, printed.err
    assert "max_archive_ratio" in printed.err and "MOME_MAX_ARCHIVE_RATIO" in printed.err
    assert not (tmp_path / "out").exists() and _extractions(temp_root) == []


def test_a_declared_huge_size_is_refused_without_reading_the_member(tmp_path, temp_root):
    """A 1 KB member declaring 3.75 GiB: the total size limit refuses it (extracting would fail on the data)."""
    archive = _one_member_zip(tmp_path / "liar.zip", bytes(range(256)) * 4)
    _patch_member(archive, uncompressed=(22, 24, 0xF000_0000))
    with pytest.raises(LimitExceeded, match="max_archive_bytes; set MOME_MAX_ARCHIVE_BYTES") as refused:
        with dicom_root(archive, InputLimits(max_archive_ratio=1e12)):
            pass
    assert refused.value.found == 0xF000_0000
    assert _extractions(temp_root) == []


def test_a_member_larger_than_declared_is_a_damaged_archive(tmp_path, temp_root):
    archive = _one_member_zip(tmp_path / "liar.zip", bytes(range(256)) * 4)
    _patch_member(archive, uncompressed=(22, 24, 10))
    with pytest.raises(ValueError, match="damaged or unsupported zip"), dicom_root(archive):
        pass
    assert _extractions(temp_root) == []


def test_a_copy_stops_at_the_declared_size():
    sink = io.BytesIO()
    assert copy_at_most(io.BytesIO(b"x" * 3000), sink, 3000, "member") == 3000 and len(sink.getvalue()) == 3000
    sink = io.BytesIO()
    with pytest.raises(ValueError, match="member: larger than its declared size of 2999 bytes"):
        copy_at_most(io.BytesIO(b"x" * 3000), sink, 2999, "member")
    assert len(sink.getvalue()) < 3000


def _symlink_zip(archive: Path) -> Path:
    link = zipfile.ZipInfo("study/link.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(link, "/etc/passwd")
    return archive


@pytest.mark.parametrize("case", ["symbolic link", "encrypted member", "unsafe path"])
def test_unsafe_members_are_refused_and_nothing_is_left(tmp_path, temp_root, case):
    archive = tmp_path / "unsafe.zip"
    if case == "symbolic link":
        _symlink_zip(archive)
    elif case == "encrypted member":
        _patch_member(_one_member_zip(archive, b"secret"), flags=(6, 8, 0x1))
    else:
        _one_member_zip(archive, b"escape", "../../outside.dcm")
    with pytest.raises(ValueError, match=case), dicom_root(archive):
        pass
    assert _extractions(temp_root) == [] and not (tmp_path / "outside.dcm").exists()


# --- series ---------------------------------------------------------------------------------------------------------


def _headers(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


@pytest.mark.parametrize("limit", list(SERIES_LIMITS))
def test_a_series_at_a_limit_is_read_and_one_over_is_refused_before_reading(tmp_path, limit):
    paths = _series_files(tmp_path / "series")
    found = SERIES_LIMITS[limit]
    headers = _headers(paths)
    full = read_pixels(headers, "series s", InputLimits(**{limit: found}))
    assert len(full) == len(paths) and all("PixelData" in ds for ds in full)
    for path in paths:
        path.write_bytes(b"gone")  # reading any file now would be a "cannot be read" rejection
    with pytest.raises(SeriesLimitExceeded) as refused:
        read_pixels(headers, "series s", InputLimits(**{limit: found - 1}))
    assert refused.value.limit == limit and refused.value.found == found and refused.value.allowed == found - 1
    assert str(refused.value).startswith("series s: ") and env_var(limit) in str(refused.value)


def test_frames_of_a_multi_frame_instance_count_as_slices(tmp_path):
    (header,) = _headers(_series_files(tmp_path / "series")[:1])
    header.NumberOfFrames = 5000
    with pytest.raises(SeriesLimitExceeded, match="is 5000, over the limit of 4096 \\(max_slices"):
        read_pixels([header], "series s", InputLimits())


@pytest.mark.parametrize(
    "keyword, value, reason",
    [("Rows", None, "no positive Rows"), ("Columns", 0, "no positive Columns"),
     ("NumberOfFrames", 0, "no positive NumberOfFrames"), ("SamplesPerPixel", 3, "several samples per pixel")],
)  # fmt: skip
def test_a_missing_or_impossible_matrix_is_a_rejection(tmp_path, keyword, value, reason):
    headers = _headers(_series_files(tmp_path / "series"))
    if value is None:
        delattr(headers[3], keyword)
    else:
        setattr(headers[3], keyword, value)
    with pytest.raises(SeriesRejected, match=reason):
        read_pixels(headers, "series s", InputLimits())


def test_a_series_over_a_limit_is_rejected_and_the_other_series_still_segmented(tmp_path):
    small = _headers(_series_files(tmp_path / "small"))
    large = _headers(_series_files(tmp_path / "large", Rows=17))
    study = str(small[0].StudyInstanceUID)
    for ds in large:
        ds.StudyInstanceUID = study
    series = {str(small[0].SeriesInstanceUID): small, str(large[0].SeriesInstanceUID): large}
    work = route_study(study, series, load_rules(None), all_series=True)
    assert len(work.tasks) == 2
    segment_study(work, _EmptySegment(), limits=InputLimits(max_matrix=16))
    rejected = work.entries[str(large[0].SeriesInstanceUID)]["rejected"]
    assert "the matrix (largest of Rows and Columns) is 17, over the limit of 16 (max_matrix" in rejected
    assert str(large[0].SeriesInstanceUID) in rejected
    assert next(t for t in work.tasks if t.header.series_uid == str(small[0].SeriesInstanceUID)).volume is not None


def test_a_12000_matrix_declared_in_the_header_exits_3_before_any_pixel_is_decoded(tmp_path, capsys):
    """Each file is 1 KB: 16x16 pixels under a header declaring 12000x12000 (decoding would fail on the length)."""
    paths = _series_files(tmp_path / "in", Rows=12000, Columns=12000)
    assert max(path.stat().st_size for path in paths) < 4096
    series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    code = run_app(tmp_path / "in", tmp_path / "out", None, AppOptions(segmenter=_NeverSegment()), prog="mome-app")
    printed = capsys.readouterr()
    assert code == 3, printed.err
    expected = f"series {series_uid}: the matrix (largest of Rows and Columns) is 12000, over the limit of 2048"
    assert expected in printed.err
    assert "MOME_MAX_MATRIX" in printed.err and "cannot be decoded" not in printed.err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["in"]
