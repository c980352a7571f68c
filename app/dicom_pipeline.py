"""DICOM study in -> modality routing -> MoME -> DICOM-SEG + QC + report, as one function call without Holoscan.

The Deploy application (``app/app.py``) runs the same stage cores (``operators/<stage>.py``) as a Holoscan graph;
this sequential form is for library use and tests that do not need the graph. Outputs and exit semantics are the
same: per study ``OUT/<StudyInstanceUID>/`` with ``seg_<SeriesInstanceUID>.dcm``, ``qc_<SeriesInstanceUID>.png`` and
``report.json``; nothing is written when no series can be segmented.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from operators.limits import InputLimits
from operators.modality_router import MODALITIES, load_rules
from operators.mome_inference import segment_study
from operators.output_folder import (
    UnusableOutputFolder,
    check_output_folder,
    missing_folders,
    remove_empty,
    staging_dir,
)
from operators.report_writer import commit, write_report
from operators.seg_writer import write_segs
from operators.study import NothingToSegment, PlusSegmenter, Segmenter, route_study
from operators.study_loader import dicom_root, scan_studies

__all__ = ["NothingToSegment", "UnusableOutputFolder", "run_dicom"]


def run_dicom(
    source: Path,
    out: Path,
    segmenter: Segmenter | None,
    modalities: Sequence[str] = MODALITIES,
    all_series: bool = False,
    rules_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
    plus_segmenter: PlusSegmenter | None = None,
    mode: str = "auto",
    limits: InputLimits | None = None,
) -> list[dict[str, Any]]:
    """Segments every study under ``source`` (folder or zip); returns the study reports (also written as JSON).

    ``plus_segmenter`` and ``mode`` as in :func:`operators.mome_inference.segment_study`;
    ``limits`` (default :meth:`InputLimits.from_env`) bound the zip and the series read.

    Raises:
        LimitSettingError: a ``MOME_MAX_*`` variable is not a positive number.
        LimitExceeded: the zip is over a limit (a series over a limit is rejected like any other bad series).
        UnusableOutputFolder: ``out`` cannot receive results (checked before anything is read; nothing is created).
        NothingToSegment: no DICOM study, or no series that the router accepts and that converts to a volume.
    """
    out = check_output_folder(out)
    rules = load_rules(rules_file)
    limits = limits or InputLimits.from_env()
    created = missing_folders(out)
    try:
        with dicom_root(source, limits) as root:
            found = scan_studies(root)
            if not found.studies:
                raise NothingToSegment(f"{source}: no DICOM image instances found ({found.skipped_files} other files).")
            staging = staging_dir(out)
            reports, works = [], []
            try:
                for study_uid, series in sorted(found.studies.items()):
                    work = route_study(study_uid, series, rules, modalities, all_series)
                    work.skipped_files = found.skipped_files
                    segment_study(work, segmenter, progress, plus_segmenter, mode, limits)
                    write_segs(work, staging / study_uid)
                    reports.append(write_report(work, staging / study_uid))
                    works.append(work)
            finally:
                if len(works) != len(found.studies):  # an unexpected error: leave nothing behind
                    shutil.rmtree(staging, ignore_errors=True)
            commit(staging, out, works, str(source))
    finally:
        remove_empty(created)  # the parents staging created, when nothing was written
    return reports
