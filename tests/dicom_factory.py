"""DICOM helpers for tests: synthetic series (the demo study's writer) and the dciodvfy validator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from app.demo_study import series_datasets as make_series

__all__ = ["DCIODVFY", "dciodvfy_errors", "make_series"]

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' validator prints for one file (it reports problems on stderr)."""
    result = subprocess.run([DCIODVFY or "dciodvfy", "-new", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
