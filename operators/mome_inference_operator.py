"""``MoMEInferenceOperator``: the native-space MoME pipeline on every chosen series of every study.

Registration to the template, MoME inference with the bundle's own network and inferer, and the inverse mapping to
the series' exact grid (:class:`scripts.pipeline.MoMESegmenter`). The bundle is a directory bundle (configs, scripts,
``models/model.pt``); the model is loaded once, at the first study.

Named input / output:
    studies: ``List[StudyWork]``; each chosen series gains its volume and native-space label map, or a rejection.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.deploy.core import Operator, OperatorSpec

from operators.study_pipeline import segment_study

__all__ = ["MoMEInferenceOperator"]


class MoMEInferenceOperator(Operator):
    """Segments lesions with a MoME bundle.

    ``device`` None picks CUDA when available; ``tta`` adds mirroring; ``profile`` picks the inference profile
    (None: the bundle's ``profile`` id).
    """

    def __init__(
        self,
        fragment: Any,
        *args: Any,
        bundle_path: Path,
        device: str | None = None,
        tta: bool = False,
        profile: str | None = None,
        progress: Callable[[str], None] | None = None,
        segmenter: Any = None,
        **kwargs: Any,
    ) -> None:
        self.bundle_path, self.device, self.tta, self.profile = Path(bundle_path), device, tta, profile
        self.progress = progress
        self._segmenter = segmenter  # None: built from the bundle at the first study
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("studies")
        spec.output("studies")

    def segmenter(self) -> Any:
        if self._segmenter is None:
            from app.bundle_path import use_bundle_scripts

            use_bundle_scripts(self.bundle_path)
            from scripts.pipeline import MoMESegmenter

            self._segmenter = MoMESegmenter(self.bundle_path, device=self.device, tta=self.tta, profile=self.profile)
        return self._segmenter

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        works = op_input.receive("studies")
        if any(work.tasks for work in works):
            segmenter = self.segmenter()
            works = [segment_study(work, segmenter, self.progress) for work in works]
        op_output.emit(works, "studies")
