"""``ModalityRouterOperator``: every MR series of each study -> T1/T1ce/T2/FLAIR/DWI or a reason to skip it.

Wraps :func:`operators.study.route_study` (rules in ``operators/modality_rules.json`` or a user file).

Named input:
    dicom_study_list: ``List[DICOMStudy]`` (from ``StudyLoaderOperator`` or the SDK's ``DICOMDataLoaderOperator``).
Named output:
    studies: ``List[StudyWork]``, one per study, with every routing decision and the chosen series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.deploy.core import Operator, OperatorSpec

from operators.modality_router import MODALITIES, load_rules
from operators.phi import redacts_errors
from operators.study import route_study
from operators.study_loader_operator import SKIPPED_FILES_KEY

__all__ = ["ModalityRouterOperator"]


@redacts_errors
class ModalityRouterOperator(Operator):
    """Routes series by header rules; one series per modality (documented preference) unless ``all_series``."""

    def __init__(
        self,
        fragment: Any,
        *args: Any,
        rules_file: Path | None = None,
        modalities: Sequence[str] = MODALITIES,
        all_series: bool = False,
        **kwargs: Any,
    ) -> None:
        self.rules = load_rules(rules_file)  # a bad rules file fails at construction, before any work
        self.modalities, self.all_series = tuple(modalities), all_series
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("dicom_study_list")
        spec.output("studies")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        works = []
        for study in op_input.receive("dicom_study_list"):
            series = {
                entry.get_series_instance_uid(): [sop.get_native_sop_instance() for sop in entry.get_sop_instances()]
                for entry in study.get_all_series()
            }
            work = route_study(study.get_study_instance_uid(), series, self.rules, self.modalities, self.all_series)
            work.skipped_files = int(study.metadata().get(SKIPPED_FILES_KEY, 0))
            works.append(work)
        op_output.emit(works, "studies")
