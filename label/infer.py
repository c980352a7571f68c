"""MONAI Label infer tasks: ``mome`` (one MR image) and ``mome_plus`` (a study's contrasts) -> labels on the image grid.

The bundle's native pipeline does the work (:class:`scripts.pipeline.MoMESegmenter` through
:func:`operators.bundle.load_segmenters`): affine registration to the MNI152 template, MoME in MoME space, class
probabilities mapped back through the inverse transform. The image may have any orientation and spacing, with or
without skull.

The task is built on MONAI Label's basic ``InferTask`` interface, not on ``BasicInferTask`` / ``BundleInferTask``:
those import ``monailabel.transform.post``, which imports torchvision, whose CUDA build on PyPI does not load with the
CPU torch. The pipeline needs neither.

``mome`` request parameters (``params`` of ``POST /infer/mome``):

* ``modality``: ``t1``, ``t1ce``, ``t2``, ``flair`` or ``dwi`` — picks the registration template's contrast. Default:
  the image name's suffix (``case_flair.nii.gz``), else for a PACS series (:mod:`label.dicomweb`) its headers through
  the modality rules. An image with none is answered 400, naming what is missing.
* ``tta``: mirror test-time augmentation (8 network passes).

``mome_plus`` takes one multi-channel NIfTI (X, Y, Z, C): co-registered contrasts of one study on one grid, at least
two of T1, T1ce, T2, FLAIR (an all-zero channel counts as missing). MoME+ (:class:`scripts.pipeline.MoMEPlusSegmenter`)
registers the reference channel (T1ce first, then T1, FLAIR, T2) to the template and returns the tumour sub-regions
(the bundle's ``channel_def``: necrotic core, oedema, enhancing) on the image grid. Parameters:

* ``channels``: the contrast of each channel in order, e.g. ``["t1ce", "flair"]``; default the model's order
  (``t1, t1ce, t2, flair``), which then needs four channels.

On a PACS series, ``mome_plus`` takes the study's series instead (``study_series``, one per contrast, chosen by the
datastore as the application chooses them), each registered to the requested series, which is the reference: the
label lies on its grid.

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

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from app.errors import InputRejected
from app.nifti_io import guess_modality, load_channels, load_volume, save_nifti
from label.params import flag, without_folder
from label.weights import ServedWeights
from operators import bundle
from operators.modality_router import MODALITIES
from operators.mome_inference import PLUS_REFERENCE_ORDER
from operators.study import PlusSegmenter, Segmenter

__all__ = ["MoMEInfer", "MoMEPlusInfer", "labels_of"]

logger = logging.getLogger(__name__)
BAD_REQUEST, UNPROCESSABLE = 400, 422
_Channels = tuple[dict[str, Any], str, np.ndarray, Any, dict[str, Any]]  # channels, reference, grid, header, record


def labels_of(channel_def: dict[str, str]) -> dict[str, int]:
    """MONAI Label's ``labels`` (name -> label value) from a bundle output's ``channel_def``, background left out."""
    return {name: int(value) for value, name in channel_def.items() if name != "background"}


class MoMEInfer(InferTask):
    """Single-contrast MoME on one native-space NIfTI image (see the module docstring).

    Args:
        segmenter: the bundle's MoME (:func:`operators.bundle.load_segmenters`).
        load_tta: loads it with mirror test-time augmentation; called on the first ``tta`` request.
        weights: the served weight files (shipped or fine-tuned); each request runs with the current ones.
    """

    def __init__(self, segmenter: Segmenter, load_tta: Callable[[], Segmenter], weights: ServedWeights) -> None:
        self.segmenter = segmenter
        self.load_tta = load_tta
        self.weights = weights
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
            raise HTTPException(UNPROCESSABLE, f"image: {without_folder(error, image)}") from None
        segmenter = self._tta() if flag(request.get("tta")) else self.segmenter
        self.weights.sync(segmenter.network, segmenter.device)
        try:
            result = segmenter.segment(array, affine, name="image", modality=modality, progress=None)
        except bundle.rejections() as error:
            raise HTTPException(UNPROCESSABLE, str(error)) from None
        output = _write_label(result.labels, affine, header)
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
            **self.weights.describe(),
            "seconds": _seconds(result.seconds, started),
        }
        lesions = f"{record['lesion_volume_ml']} mL in {record['lesion_count']} lesion(s)"
        logger.info("mome (%s): %s, %s s", modality, lesions, record["seconds"]["total"])
        return str(output), record

    def _tta(self) -> Segmenter:
        with self._loading:
            if self._tta_segmenter is None:
                self._tta_segmenter = self.load_tta()
            return self._tta_segmenter

    @staticmethod
    def _modality(request: dict[str, Any], image: Path) -> tuple[str, str]:
        """The contrast from the request, else the image name, else a PACS series' headers; 400 when none gives one."""
        asked = str(request.get("modality") or "").strip().lower()
        if asked:
            if asked not in MODALITIES:
                raise HTTPException(BAD_REQUEST, f"modality {asked!r}: not one of {', '.join(MODALITIES)}.")
            return asked, "request"
        guessed = guess_modality(image)
        if guessed is not None:
            return guessed, "image name"
        series = request.get("series")
        if series and series.get("modality"):
            return series["modality"], f"series headers (rule {series['routing']['rule']})"
        routed = f" The series headers say: {series['routing']['reason']}." if series else ""
        raise HTTPException(
            BAD_REQUEST,
            f'no modality: pass params {{"modality": ...}} ({", ".join(MODALITIES)}) or name the image '
            f"with a suffix such as _flair.{routed}",
        )


def _seconds(stages: dict[str, float], started: float) -> dict[str, float]:
    """The pipeline's stage seconds and the request's total, rounded."""
    total = round(time.perf_counter() - started, 2)
    return {**{stage: round(value, 2) for stage, value in stages.items()}, "total": total}


def _write_label(labels: np.ndarray, affine: np.ndarray, header: Any) -> Path:
    """The label map as a NIfTI file on the input's grid, in a temporary file the server removes once sent."""
    with tempfile.NamedTemporaryFile(prefix="mome-label-", suffix=".nii.gz", delete=False) as handle:
        output = Path(handle.name)
    save_nifti(labels, affine, output, header)
    return output


class MoMEPlusInfer(InferTask):
    """MoME+ on one multi-channel NIfTI of co-registered contrasts (see the module docstring).

    Args:
        segmenter: the bundle's MoME+ (:func:`operators.bundle.load_segmenters` in ``plus`` mode).
    """

    MIN_CHANNELS = 2

    def __init__(self, segmenter: PlusSegmenter) -> None:
        self.segmenter = segmenter
        names = ", ".join(segmenter.modalities)
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels_of(segmenter.channel_def),
            dimension=3,
            description=(
                f"MoME+ tumour sub-regions from at least two contrasts of one study ({names}): co-registered "
                "channels of one image, or a PACS series with its study's other series"
            ),
            config={"channels": list(segmenter.modalities)},
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segments the channels of ``request["image"]`` (or a PACS study's series); returns the label file and its
        record."""
        started = time.perf_counter()
        image = Path(request["image"])
        if request.get("study_series"):
            channels, reference, affine, header, described = self._study_channels(request, image)
        else:
            channels, reference, affine, header, described = self._image_channels(request, image)
        try:
            result = self.segmenter.segment_channels(channels, reference, None)
        except bundle.rejections() as error:
            raise HTTPException(UNPROCESSABLE, str(error)) from None
        output = _write_label(result.labels, affine, header)
        record = {
            "model": "mome_plus",
            "label_names": dict(self.labels),
            **described,
            "reference": reference,
            "modalities_available": [m for m, available in result.availability.items() if available],
            "modalities_excluded": dict(result.excluded),
            **bundle.lesion_summary(result.labels > 0, affine),
            "region_volume_ml": bundle.region_volumes(result.labels, affine, self.labels),
            "registration": result.registration.to_dict(),
            "coregistration": {m: c.to_dict() for m, c in result.coregistration.items()},
            "inference": result.inference,
            "bundle": self.segmenter.describe(),
            "seconds": _seconds(result.seconds, started),
        }
        total = record["seconds"]["total"]
        logger.info("mome_plus (%s): %s mL, %s s", "+".join(channels), record["lesion_volume_ml"], total)
        return str(output), record

    def _image_channels(self, request: dict[str, Any], image: Path) -> _Channels:
        """The contrasts stored as the channels of one image (local datastore or upload)."""
        order = self._channel_order(request)
        try:
            array, affine, header = load_channels(image, max_channels=len(self.segmenter.modalities))
        except InputRejected as error:
            raise HTTPException(UNPROCESSABLE, f"image: {without_folder(error, image)}") from None
        if array.shape[3] != len(order):
            raise HTTPException(
                UNPROCESSABLE,
                f"image has {array.shape[3]} channel(s) but params channels names {len(order)} ({', '.join(order)}).",
            )
        present = [m for i, m in enumerate(order) if np.ptp(array[..., i]) > 0]
        self._check_enough(present, "the image holds", "(an all-zero channel is missing)")
        channels = {m: bundle.plus_channel(array[..., order.index(m)], affine, "image", m) for m in present}
        reference = next(m for m in PLUS_REFERENCE_ORDER if m in channels)
        return channels, reference, affine, header, {"channels": order}

    def _study_channels(self, request: dict[str, Any], image: Path) -> _Channels:
        """A PACS study's series, one per contrast (:meth:`label.dicomweb.MoMEDICOMwebDatastore.study_series`); the
        requested series is the reference, so the label lies on its grid."""
        requested = request["series"]
        reference = requested.get("modality")
        if reference not in self.segmenter.modalities:
            raise HTTPException(
                UNPROCESSABLE,
                f"series {requested['series_uid']} is {reference or 'not an MR contrast MoME reads'} "
                f"({requested['routing']['reason']}); MoME+ takes a {', '.join(self.segmenter.modalities)} series.",
            )
        study = request["study_series"]
        self._check_enough(list(study), "the study has", "series that pass their checks")
        channels = {}
        for modality, series in study.items():
            array, affine, header = load_volume(Path(series["image"]))
            name = f"series {series['series_uid']}"
            channels[modality] = bundle.plus_channel(array, affine, series["frame_of_reference"], name)
        _, affine, header = load_volume(image)
        described = {
            "series": {m: series["series_uid"] for m, series in study.items()},
            "series_left_out": dict(request.get("series_left_out") or {}),
        }
        return channels, reference, affine, header, described

    def _check_enough(self, present: list[str], holds: str, note: str) -> None:
        """422 unless at least ``MIN_CHANNELS`` of MoME+'s contrasts are ``present``."""
        if len(present) < self.MIN_CHANNELS:
            raise HTTPException(
                UNPROCESSABLE,
                f"MoME+ needs at least {self.MIN_CHANNELS} of {', '.join(self.segmenter.modalities)}; {holds} "
                f"{', '.join(present) or 'none'} {note}. For one contrast use mome.",
            )

    def _channel_order(self, request: dict[str, Any]) -> list[str]:
        """The contrast of each channel: the request's ``channels``, else the model's order; 400 when malformed."""
        asked = request.get("channels") or list(self.segmenter.modalities)
        order = [str(m).strip().lower() for m in (asked.split(",") if isinstance(asked, str) else asked)]
        unknown = [m for m in order if m not in self.segmenter.modalities]
        if unknown or len(set(order)) != len(order):
            raise HTTPException(
                BAD_REQUEST,
                f"channels {order}: each must be one of {', '.join(self.segmenter.modalities)}, none twice.",
            )
        return order
