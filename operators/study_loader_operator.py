"""``StudyLoaderOperator``: the SDK's DICOM loader, extended for zips, odd files and lazy pixel reading.

It emits the SDK's own ``List[DICOMStudy]`` on the same port (``dicom_study_list``), so it is a drop-in replacement
for ``DICOMDataLoaderOperator`` and the stock loader can be wired in its place. Differences, and why:

- the input may be a folder tree **or a zip** (PACS exports often are);
- instances are read **without pixel data**; only the series that are segmented are read in full later, so a study
  with hundreds of series costs little memory;
- non-DICOM and unreadable files (and DICOMDIR) are skipped and counted, never fatal; the count reaches the report;
- instances at **duplicate positions are kept**, so the series check rejects such a series with a reason instead of
  silently dropping slices (the stock loader keeps the highest AcquisitionNumber);
- a zip is checked against the **input limits** (``operators.limits``) before anything is extracted;
- nothing about the patient is logged.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, List

from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator

from operators.limits import InputLimits
from operators.phi import redacts_errors
from operators.study_loader import dicom_root, scan_studies

__all__ = ["SKIPPED_FILES_KEY", "StudyLoaderOperator"]

SKIPPED_FILES_KEY = "skipped_non_dicom_files"  # in each DICOMStudy's metadata()


@redacts_errors
class StudyLoaderOperator(DICOMDataLoaderOperator):
    """Loads every study under a folder or zip (headers only) as ``List[DICOMStudy]``.

    Named output:
        dicom_study_list: one ``DICOMStudy`` per StudyInstanceUID, sorted by UID; each study's ``metadata()`` holds
        ``skipped_non_dicom_files``. Zip contents live in a temporary folder until the operator stops.

    ``limits`` bound what a zip may expand to (None: :meth:`InputLimits.from_env` when the input is read).
    """

    def __init__(
        self, fragment: Any, *args: Any, input_path: Path, limits: InputLimits | None = None, **kwargs: Any
    ) -> None:
        self._extracted = ExitStack()
        self.limits = limits
        super().__init__(fragment, *args, input_folder=Path(input_path), must_load=False, **kwargs)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        op_output.emit(self.load_data_to_studies(self.input_path), self.output_name)

    def load_data_to_studies(self, input_path: Path) -> List[DICOMStudy]:
        root = self._extracted.enter_context(dicom_root(Path(input_path), self.limits))
        found = scan_studies(root)
        return [self._study(uid, series, found.skipped_files) for uid, series in sorted(found.studies.items())]

    def _study(self, study_uid: str, series: dict, skipped_files: int) -> DICOMStudy:
        study = DICOMStudy(study_uid)
        study.metadata()[SKIPPED_FILES_KEY] = skipped_files
        for series_uid, headers in sorted(series.items()):
            if not study.get_all_series():
                self.populate_study_attributes(study, headers[0])
            entry = DICOMSeries(series_uid)
            self.populate_series_attributes(entry, headers[0])
            for header in headers:
                entry.add_sop_instance(header)  # the series wraps it in a DICOMSOPInstance
            study.add_series(entry)
        return study

    def stop(self) -> None:
        self._extracted.close()
