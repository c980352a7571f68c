"""``LesionSegWriterOperator``: one binary DICOM-SEG per segmented series, on the series' exact source grid.

Wraps :func:`operators.seg_writer.write_segs` (highdicom; one frame per source slice in sorted instance order,
empty frames kept, segment "Lesion" with SNOMED codes, algorithm identification from the bundle metadata). Files go
to ``staging/<StudyInstanceUID>/``; the report writer moves them into the output folder at the end.

Named input / output:
    studies: ``List[StudyWork]``; each segmented series gains its SEG file name and UIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.deploy.core import Operator, OperatorSpec

from operators.phi import redacts_errors
from operators.seg_writer import write_segs

__all__ = ["LesionSegWriterOperator"]


@redacts_errors
class LesionSegWriterOperator(Operator):
    """Writes the SEGs of every study into ``staging``."""

    def __init__(self, fragment: Any, *args: Any, staging: Path, **kwargs: Any) -> None:
        self.staging = Path(staging)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("studies")
        spec.output("studies")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        works = op_input.receive("studies")
        op_output.emit([write_segs(work, self.staging / work.study_uid) for work in works], "studies")
