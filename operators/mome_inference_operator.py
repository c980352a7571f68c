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

from operators.limits import InputLimits
from operators.phi import redacts_errors
from operators.study_pipeline import segment_study

__all__ = ["MoMEInferenceOperator"]


@redacts_errors
class MoMEInferenceOperator(Operator):
    """Segments lesions with a MoME bundle.

    ``device`` None picks CUDA when available; ``tta`` adds mirroring; ``profile`` picks the inference profile
    (None: the bundle's ``profile`` id); ``mode`` (``auto``, ``single``, ``plus``) decides whether the T1/T1ce/T2/FLAIR
    series of a study go to the bundle's MoME+ model together (see ``operators.study_pipeline``); ``limits`` bound
    the series whose pixels are read (None: :meth:`InputLimits.from_env` at each study).
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
        mode: str = "auto",
        plus_segmenter: Any = None,
        limits: InputLimits | None = None,
        **kwargs: Any,
    ) -> None:
        self.bundle_path, self.device, self.tta, self.profile = Path(bundle_path), device, tta, profile
        self.progress, self.mode, self.limits = progress, mode, limits
        self._segmenter = segmenter  # None: built from the bundle at the first study
        self._plus_segmenter = plus_segmenter
        self._built = segmenter is not None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("studies")
        spec.output("studies")

    def segmenter(self) -> tuple[Any, Any]:
        """(single-modality MoME or None, MoME+ or None), built from the bundle at the first call."""
        if not self._built:
            from app.bundle_path import installed_models, use_bundle_scripts

            use_bundle_scripts(self.bundle_path)
            from scripts.pipeline import MoMEPlusSegmenter, MoMESegmenter

            models = installed_models(self.bundle_path)
            options = {"device": self.device, "tta": self.tta, "profile": self.profile}
            if models["single"] or not models["plus"]:  # without any weights MoMESegmenter says so
                self._segmenter = MoMESegmenter(self.bundle_path, **options)
            if models["plus"] and self.mode != "single":
                self._plus_segmenter = MoMEPlusSegmenter(self.bundle_path, **options)
            self._built = True
        return self._segmenter, self._plus_segmenter

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        works = op_input.receive("studies")
        if any(work.tasks for work in works):
            single, plus = self.segmenter()
            works = [segment_study(work, single, self.progress, plus, self.mode, self.limits) for work in works]
        op_output.emit(works, "studies")
