"""Finding DICOM instances in a folder tree or a zip and grouping them by study and series (headers only).

Non-DICOM files (and DICOMDIR indexes) are skipped and counted; pixel data are read later, only for the series that
are segmented. Patient identifiers are never logged; studies and series are named by their UIDs.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import pydicom
from pydicom.errors import InvalidDicomError

__all__ = ["DicomInput", "dicom_root", "scan_studies"]

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class DicomInput:
    """Studies (StudyInstanceUID -> SeriesInstanceUID -> instance headers) and how many files were skipped.

    Each header is a pydicom ``Dataset`` read without pixel data; its ``filename`` says where to read the pixels.
    """

    studies: Dict[str, Dict[str, List[pydicom.Dataset]]]
    skipped_files: int


@contextmanager
def dicom_root(path: Path) -> Iterator[Path]:
    """``path`` itself for a folder; a zip is extracted into a temporary folder (removed afterwards)."""
    if path.is_dir():
        yield path
        return
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a folder or a zip archive of DICOM files.")
    with tempfile.TemporaryDirectory(prefix="mome-dicom-") as folder, zipfile.ZipFile(path) as archive:
        root = Path(folder).resolve()
        for member in archive.infolist():
            target = (root / member.filename).resolve()
            if root not in target.parents and target != root:
                raise ValueError(f"{path}: unsafe path in the archive ({member.filename!r}).")
        archive.extractall(root)
        yield root


def scan_studies(root: Path) -> DicomInput:
    """Reads every file's header under ``root`` (recursively) and groups the image instances."""
    studies: Dict[str, Dict[str, List[pydicom.Dataset]]] = defaultdict(dict)
    skipped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped += 1
            continue
        study, series = getattr(header, "StudyInstanceUID", None), getattr(header, "SeriesInstanceUID", None)
        if not study or not series or str(getattr(header, "SOPClassUID", "")) == DICOMDIR_CLASS:
            skipped += 1
            continue
        studies[str(study)].setdefault(str(series), []).append(header)
    return DicomInput(dict(studies), skipped)
