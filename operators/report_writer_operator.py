"""``ReportWriterOperator``: QC PNGs and ``report.json`` per study, then the atomic move into the output folder.

Wraps :func:`operators.report_writer.write_report` and :func:`~operators.report_writer.commit`. It never raises for
an input that yields nothing to segment or an output folder that cannot take the files: it hands the outcome (the
reports, or the :class:`NothingToSegment` / :class:`UnusableOutputFolder` error) to ``on_done`` so the application can
choose its exit code without a graph failure.

Named input:
    studies: ``List[StudyWork]`` with their SEGs written to ``staging``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.deploy.core import Operator, OperatorSpec

from operators.output_folder import UnusableOutputFolder
from operators.phi import redacts_errors
from operators.report_writer import commit, write_report
from operators.study import NothingToSegment

__all__ = ["ReportWriterOperator"]


@redacts_errors
class ReportWriterOperator(Operator):
    """Writes reports and QC images into ``staging`` and commits them to ``output_folder``."""

    def __init__(
        self,
        fragment: Any,
        *args: Any,
        staging: Path,
        output_folder: Path,
        on_done: Callable[[list[dict] | NothingToSegment | UnusableOutputFolder], None],
        source: str = "input",
        **kwargs: Any,
    ) -> None:
        self.staging, self.output_folder = Path(staging), Path(output_folder)
        self.on_done, self.source = on_done, source
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("studies")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        works = op_input.receive("studies")
        reports = [write_report(work, self.staging / work.study_uid) for work in works]
        try:
            commit(self.staging, self.output_folder, works, self.source)
        except (NothingToSegment, UnusableOutputFolder) as error:
            self.on_done(error)
            return
        self.on_done(reports)
