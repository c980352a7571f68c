"""MONAI Label train task ``mome``: fine-tunes the served MoME on the labels users saved (tag ``final``).

Each labelled image is taken to MoME space as the native pipeline does (registration to the template), then the
bundle's trainer continues from the served weights at a small learning rate (:func:`scripts.finetune.fine_tune`).
The result becomes the served model (:class:`label.weights.ServedWeights`: the next ``mome`` inference uses it); the
bundle's shipped weights stay untouched, and ``{"restore": true}`` serves them again.

Request parameters (``POST /train/mome``, ``params``): ``epochs``, ``iterations_per_epoch``, ``learning_rate`` (see
:class:`scripts.finetune.FineTuning`), ``restore``. A labelled image needs its contrast in its name (``_flair``...)
or in the request's ``modality`` (a PACS series: its headers, see :mod:`label.dicomweb`); images without one are
skipped and listed with the reason.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from app.errors import InputRejected
from app.nifti_io import guess_modality, load_volume
from label.params import flag
from label.weights import ServedWeights
from operators import bundle
from operators.study import Segmenter

__all__ = ["MoMETrain"]

logger = logging.getLogger(__name__)
SETTINGS = {"epochs": int, "iterations_per_epoch": int, "learning_rate": float}


class TrainableSegmenter(Segmenter, Protocol):
    """A MoME segmenter that can prepare training cases (``scripts.pipeline.MoMESegmenter``)."""

    network: torch.nn.Module
    device: torch.device
    patch_size: list[int]
    modalities: list[str]

    def training_case(
        self, array: np.ndarray, affine: np.ndarray, labels: np.ndarray, modality: str, name: str
    ) -> dict[str, Any]: ...


class MoMETrain(TrainTask):
    """Fine-tunes ``segmenter``'s network on the datastore's final labels and serves the result (module docstring).

    Args:
        segmenter: the served MoME (its network is copied, not changed).
        weights: the served weight files.
    """

    def __init__(self, segmenter: TrainableSegmenter, weights: ServedWeights) -> None:
        super().__init__("Fine-tune MoME on the labels saved as final; the result is served, the shipped weights kept")
        self.segmenter = segmenter
        self.weights = weights
        self._stats: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        defaults = bundle.bundle_scripts("finetune").FineTuning()
        return {name: getattr(defaults, name) for name in SETTINGS} | {"restore": False}

    def stats(self) -> dict[str, Any]:
        return self._stats

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if flag(request.get("restore")):
            restored = self.weights.restore()
            return {"restored": restored, **self.weights.describe()}
        started = time.perf_counter()
        cases, skipped = self._cases(datastore.datalist(), request.get("modality"))
        if not cases:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"nothing to train on: no usable final label ({skipped or 'none saved'}).",
            )
        finetune = bundle.bundle_scripts("finetune")
        settings = finetune.FineTuning(**{k: cast(request[k]) for k, cast in SETTINGS.items() if k in request})
        self.weights.sync(self.segmenter.network, self.segmenter.device)  # continue from what is served
        self.weights.fine_tuned.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="train-", dir=self.weights.fine_tuned.parent) as work:
            trained, history = finetune.fine_tune(self.segmenter, cases, Path(work), settings)
            self.weights.install(trained)
        self._stats = {
            "cases": [case["case"] for case in cases],
            "skipped": skipped,
            "settings": vars(settings),
            "history": history,
            "seconds": round(time.perf_counter() - started, 1),
            **self.weights.describe(),
        }
        logger.info("mome fine-tuned on %d case(s) in %s s", len(cases), self._stats["seconds"])
        return self._stats

    def _cases(self, datalist: list[dict[str, Any]], modality: str | None) -> tuple[list[dict], dict[str, str]]:
        """Training cases of the labelled images; the others by name with why they were skipped."""
        cases, skipped = [], {}
        for item in datalist:
            image, label = Path(item["image"]), Path(item["label"])
            contrast = guess_modality(image) or item.get("modality") or modality
            if contrast is None:
                skipped[image.name] = "no contrast in the name (e.g. _flair) nor in the request's modality"
                continue
            try:
                array, affine, _ = load_volume(image)
                labels, _, _ = load_volume(label)
                cases.append(self.segmenter.training_case(array, affine, labels, contrast, image.name))
            except (InputRejected, ValueError) as error:
                skipped[image.name] = str(error)
        return cases, skipped
