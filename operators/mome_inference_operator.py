"""``MoMEInferenceOperator``: the native-space MoME pipeline on every chosen series of every study.

Wraps :func:`operators.mome_inference.segment_study`: registration to the template, MoME (and MoME+) inference with
the bundle's own network and inferer, and the inverse mapping to the series' exact grid. The bundle is a directory
bundle (configs, scripts, ``models/``); its models (:func:`operators.bundle.load_segmenters`) are loaded once, at the
first study that has a series to segment.

Named input / output:
    studies: ``List[StudyWork]``; each chosen series gains its volume and native-space label map, or a rejection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.deploy.core import Operator, OperatorSpec

from operators.bundle import Models, load_segmenters
from operators.limits import InputLimits
from operators.mome_inference import segment_study
from operators.phi import redacts_errors
from operators.study import PlusSegmenter, Segmenter

__all__ = ["MoMEInferenceOperator"]

logger = logging.getLogger(__name__)


@redacts_errors
class MoMEInferenceOperator(Operator):
    """Segments lesions with a MoME bundle.

    ``device`` None picks CUDA when available; ``tta`` adds mirroring; ``profile`` picks the inference profile
    (None: the bundle's ``profile`` id); ``mode`` (``auto``, ``single``, ``plus``: :data:`operators.study.MODES`)
    decides whether the T1/T1ce/T2/FLAIR series of a study go to the bundle's MoME+ model together; ``limits`` bound
    the series whose pixels are read (None: :meth:`InputLimits.from_env` at each study). ``segmenter`` /
    ``plus_segmenter`` replace the bundle's models (embedding, tests).
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
        segmenter: Segmenter | None = None,
        mode: str = "auto",
        plus_segmenter: PlusSegmenter | None = None,
        limits: InputLimits | None = None,
        **kwargs: Any,
    ) -> None:
        self.bundle_path, self.device, self.tta, self.profile = Path(bundle_path), device, tta, profile
        self.progress, self.mode, self.limits = progress, mode, limits
        given = segmenter is not None or plus_segmenter is not None
        self._models = Models(segmenter, plus_segmenter) if given else None  # None: loaded at the first study
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("studies")
        spec.output("studies")

    def models(self) -> Models:
        """The models this run uses, loaded from the bundle at the first call."""
        if self._models is None:
            self._models = load_segmenters(self.bundle_path, self.mode, self.device, self.tta, self.profile)
        return self._models

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        works = op_input.receive("studies")
        if any(work.tasks for work in works):
            models = self.models()
            for work in works:
                logger.info("study %s: %d series to segment", work.study_uid, len(work.tasks))
                segment_study(work, models.single, self.progress, models.plus, self.mode, self.limits)
        op_output.emit(works, "studies")
