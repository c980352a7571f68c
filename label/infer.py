"""MONAI Label infer task ``mome``: a native-space MR image -> its lesion label on the image's own grid.

The bundle's native pipeline does the work (:class:`scripts.pipeline.MoMESegmenter` through
:func:`operators.bundle.load_segmenters`): affine registration to the MNI152 template, MoME in MoME space, class
probabilities mapped back through the inverse transform. The image may have any orientation and spacing, with or
without skull.

The task is built on MONAI Label's basic ``InferTask`` interface, not on ``BasicInferTask`` / ``BundleInferTask``:
those import ``monailabel.transform.post``, which imports torchvision, whose CUDA build on PyPI does not load with the
CPU torch. The pipeline needs neither.

Request parameters (``params`` of ``POST /infer/mome``):

* ``modality``: ``t1``, ``t1ce``, ``t2``, ``flair`` or ``dwi`` — picks the registration template's contrast. Default:
  the image name's suffix (``case_flair.nii.gz``). An image with neither is answered 400, naming what is missing.
* ``tta``: mirror test-time augmentation (8 network passes).

Bad input is answered with a 4xx status and the reason (a file that is not one 3-D NIfTI volume, or whose
registration fails its quality checks: 422); the server keeps serving.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from app.errors import InputRejected
from app.nifti_io import guess_modality, load_volume, save_nifti
from operators import bundle
from operators.modality_router import MODALITIES
from operators.study import Segmenter

__all__ = ["MoMEInfer", "labels_of"]

logger = logging.getLogger(__name__)
BAD_REQUEST, UNPROCESSABLE = 400, 422


def labels_of(channel_def: dict[str, str]) -> dict[str, int]:
    """MONAI Label's ``labels`` (name -> label value) from a bundle output's ``channel_def``, background left out."""
    return {name: int(value) for value, name in channel_def.items() if name != "background"}


class MoMEInfer(InferTask):
    """Single-contrast MoME on one native-space NIfTI image (see the module docstring).

    Args:
        load: loads the bundle's MoME (:func:`operators.bundle.load_segmenters`), with mirror test-time augmentation
            when called with True; the TTA model is loaded on the first ``tta`` request.
    """

    def __init__(self, load: Callable[[bool], Segmenter]) -> None:
        self.load = load
        self.segmenter = load(False)
        self._tta_segmenter: Segmenter | None = None
        self._loading = threading.Lock()
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels_of(self.segmenter.channel_def),
            dimension=3,
            description=(
                "MoME brain-lesion segmentation of one MR image (T1, T1ce, T2, FLAIR or DWI; any orientation and "
                "spacing, with or without skull) on the image's own grid"
            ),
            config={"modality": "", "tta": False},
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segments ``request["image"]``; returns the label file (removed by the server once sent) and its record."""
        started = time.perf_counter()
        image = Path(request["image"])
        modality, source = self._modality(request, image)
        try:
            array, affine, header = load_volume(image)
        except InputRejected as error:
            raise HTTPException(UNPROCESSABLE, f"image: {_without_folder(error, image)}") from None
        segmenter = self._tta() if _flag(request.get("tta")) else self.segmenter
        try:
            result = segmenter.segment(array, affine, name="image", modality=modality, progress=None)
        except bundle.rejections() as error:
            raise HTTPException(UNPROCESSABLE, str(error)) from None
        with tempfile.NamedTemporaryFile(prefix="mome-label-", suffix=".nii.gz", delete=False) as handle:
            output = Path(handle.name)
        save_nifti(result.labels, affine, output, header)
        registration = result.registration.to_dict()
        record = {
            "model": "mome",
            "modality": modality,
            "modality_source": source,
            "label_names": dict(self.labels),
            **bundle.lesion_summary(result.labels, affine),
            "registration": registration,
            "warnings": list(registration["warnings"]),
            "inference": result.inference,
            "bundle": segmenter.describe(),
            "seconds": {**{k: round(v, 2) for k, v in result.seconds.items()}, "total": _since(started)},
        }
        lesions = f"{record['lesion_volume_ml']} mL in {record['lesion_count']} lesion(s)"
        logger.info("mome (%s): %s, %s s", modality, lesions, record["seconds"]["total"])
        return str(output), record

    def _tta(self) -> Segmenter:
        with self._loading:
            if self._tta_segmenter is None:
                self._tta_segmenter = self.load(True)
            return self._tta_segmenter

    @staticmethod
    def _modality(request: dict[str, Any], image: Path) -> tuple[str, str]:
        """The contrast from the request, else from the image name; 400 when neither gives one."""
        asked = str(request.get("modality") or "").strip().lower()
        if asked:
            if asked not in MODALITIES:
                raise HTTPException(BAD_REQUEST, f"modality {asked!r}: not one of {', '.join(MODALITIES)}.")
            return asked, "request"
        guessed = guess_modality(image)
        if guessed is None:
            raise HTTPException(
                BAD_REQUEST,
                f'no modality: pass params {{"modality": ...}} ({", ".join(MODALITIES)}) or name the image '
                "with a suffix such as _flair.",
            )
        return guessed, "image name"


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _without_folder(error: Exception, image: Path) -> str:
    """The error message without the server's temporary folder."""
    return str(error).replace(str(image), image.name)
