"""Finding DICOM instances in a folder tree or a zip and grouping them by study and series (headers only).

Non-DICOM files (and DICOMDIR indexes) are skipped and counted; pixel data are read later, only for the series that
are segmented. Patient identifiers are never logged; studies and series are named by their UIDs.

A zip is checked against :class:`operators.limits.InputLimits` on its central directory before anything is extracted,
then extracted member by member with each copy stopped at the member's declared size, into a temporary folder that is
removed afterwards, also when the archive is refused. Members outside that folder, symbolic links and encrypted
members are refused; folder entries are skipped.
"""

from __future__ import annotations

import errno
import lzma
import stat
import tempfile
import zipfile
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Sequence

import pydicom
from pydicom.errors import InvalidDicomError

from operators.dicom_series import SeriesRejected
from operators.limits import InputLimits, check_series
from operators.phi import register_dataset

__all__ = ["ArchiveRejected", "DicomInput", "copy_at_most", "dicom_root", "read_pixels", "scan_studies"]


DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
CHUNK_BYTES = 1 << 20
# what a damaged or unsupported archive raises while it is read (a full disk is not the input's fault: re-raised)
ARCHIVE_FAULTS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, OSError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ArchiveRejected(ValueError):
    """The input is neither a folder nor a readable, safe zip of DICOM files; the message names it and why."""


@dataclass
class DicomInput:
    """Studies (StudyInstanceUID -> SeriesInstanceUID -> instance headers) and how many files were skipped.

    Each header is a pydicom ``Dataset`` read without pixel data; its ``filename`` says where to read the pixels.
    """

    studies: Dict[str, Dict[str, List[pydicom.Dataset]]]
    skipped_files: int


@contextmanager
def dicom_root(path: Path, limits: InputLimits | None = None) -> Iterator[Path]:
    """``path`` itself for a folder; a zip is extracted into a temporary folder (removed afterwards).

    ``limits`` defaults to :meth:`InputLimits.from_env`.

    Raises:
        LimitExceeded: the zip has too many members, too large a total size or too high a compression ratio.
        ArchiveRejected: not a folder or zip; a member outside the folder, a symbolic link or encrypted; a damaged
            zip.
    """
    if path.is_dir():
        yield path
        return
    if not zipfile.is_zipfile(path):
        raise ArchiveRejected(f"{path}: not a folder or a zip archive of DICOM files.")
    limits = limits or InputLimits.from_env()
    with tempfile.TemporaryDirectory(prefix="mome-dicom-") as folder:
        root = Path(folder).resolve()
        try:
            with zipfile.ZipFile(path) as archive:
                _extract(archive, path, root, limits)
        except ARCHIVE_FAULTS as error:
            if getattr(error, "errno", None) in DISK_FULL:
                raise
            raise ArchiveRejected(f"{path}: damaged or unsupported zip ({type(error).__name__}: {error}).") from error
        yield root


def _extract(archive: zipfile.ZipFile, path: Path, root: Path, limits: InputLimits) -> None:
    """Checks the declared sizes of ``archive`` (read from ``path``), then copies each file member into ``root``."""
    name, members = str(path), archive.infolist()
    limits.check("max_archive_members", len(members), name)
    total = sum(member.file_size for member in members)
    limits.check("max_archive_bytes", total, name)
    limits.check("max_archive_ratio", total / max(path.stat().st_size, 1), name)
    targets = [_member_target(root, member, name) for member in members]  # every member is checked before writing
    for member, target in zip(members, targets):
        if member.is_dir():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as source, target.open("wb") as sink:
            copy_at_most(source, sink, member.file_size, f"{name}: member {member.filename!r}")


def _member_target(root: Path, member: zipfile.ZipInfo, name: str) -> Path:
    """Where a member is extracted; refuses a path outside ``root``, a symbolic link and an encrypted member."""
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ArchiveRejected(f"{name}: symbolic link in the archive ({member.filename!r}).")
    if member.flag_bits & 0x1:
        raise ArchiveRejected(f"{name}: encrypted member in the archive ({member.filename!r}).")
    target = (root / member.filename).resolve()
    if root not in target.parents and target != root:
        raise ArchiveRejected(f"{name}: unsafe path in the archive ({member.filename!r}).")
    return target


def copy_at_most(source: BinaryIO, sink: BinaryIO, size: int, name: str) -> int:
    """Copies ``source`` into ``sink`` in chunks and returns the byte count; never writes more than ``size`` bytes.

    Raises:
        ArchiveRejected: ``source`` holds more than ``size`` bytes (an archive member larger than its declared size).
    """
    copied = 0
    while chunk := source.read(min(CHUNK_BYTES, size - copied + 1)):
        copied += len(chunk)
        if copied > size:
            raise ArchiveRejected(f"{name}: larger than its declared size of {size} bytes (damaged or crafted).")
        sink.write(chunk)
    return copied


def scan_studies(root: Path) -> DicomInput:
    """Reads every file's header under ``root`` (recursively) and groups the image instances."""
    studies: Dict[str, Dict[str, List[pydicom.Dataset]]] = defaultdict(dict)
    skipped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            register_dataset(header)  # before any value is read: libraries may quote values in warnings and logs
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped += 1
            continue
        study, series = getattr(header, "StudyInstanceUID", None), getattr(header, "SeriesInstanceUID", None)
        if not study or not series or str(getattr(header, "SOPClassUID", "")) == DICOMDIR_CLASS:
            skipped += 1
            continue
        studies[str(study)].setdefault(str(series), []).append(header)
    return DicomInput(dict(studies), skipped)


def read_pixels(instances: Sequence[Any], name: str, limits: InputLimits | None = None) -> list[Any]:
    """Full datasets: instances read without pixel data (``stop_before_pixels``) are read again from their file.

    The series' declared matrix, slices and voxels are checked against ``limits`` (default
    :meth:`InputLimits.from_env`) first, so no pixel data is read or decoded for a series over a limit.

    Raises:
        SeriesLimitExceeded: the series is over a limit (a :class:`SeriesRejected`).
        SeriesRejected: an instance has no pixel data, no valid Rows/Columns, or its file cannot be read (named by
            SOPInstanceUID).
    """
    check_series(instances, name, limits or InputLimits.from_env())
    full = []
    for ds in instances:
        if "PixelData" not in ds and getattr(ds, "filename", None):
            try:
                ds = pydicom.dcmread(ds.filename)
            except Exception as error:  # truncated or vanished file: pydicom raises several types
                uid = getattr(ds, "SOPInstanceUID", "?")
                raise SeriesRejected(f"{name}: instance {uid} cannot be read ({type(error).__name__}).") from error
        if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise SeriesRejected(f"{name}: instance {getattr(ds, 'SOPInstanceUID', '?')} has no pixel data.")
        full.append(ds)
    return full
