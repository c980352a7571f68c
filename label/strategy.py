"""MONAI Label active-learning strategy ``expert_disagreement``: the unlabelled image whose MoME experts disagree most.

MoME holds one expert per contrast; where they disagree about the lesion, the model is least sure, and a label
teaches it most. Each unlabelled single-contrast image is scored with
:meth:`scripts.pipeline.MoMESegmenter.expert_disagreement` (the mean spread of the experts' lesion probabilities over
the brain, with the served weights); scores are cached per image file and weights. Images that cannot be scored
(multi-channel, or failing registration) are listed with the reason and never offered.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from app.errors import InputRejected
from app.nifti_io import guess_modality, load_volume
from label.params import without_folder
from label.weights import ServedWeights
from operators import bundle

__all__ = ["ExpertDisagreement"]

logger = logging.getLogger(__name__)


class ExpertDisagreement(Strategy):
    """Offers next the unlabelled image with the highest expert disagreement (see the module docstring).

    Args:
        segmenter: the served MoME (``scripts.pipeline.MoMESegmenter``).
        weights: the served weight files (scores are recomputed when they change).
    """

    def __init__(self, segmenter: Any, weights: ServedWeights) -> None:
        super().__init__("The unlabelled image whose MoME experts disagree most about the lesion")
        self.segmenter = segmenter
        self.weights = weights
        self._scores: dict[tuple, float] = {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        scores, skipped = {}, {}
        self.weights.sync(self.segmenter.network, self.segmenter.device)
        for image_id in images:
            path = Path(datastore.get_image_uri(image_id))
            try:
                scores[image_id] = self._score(path)
            except (InputRejected, *bundle.rejections()) as error:
                skipped[image_id] = without_folder(error, path)
        if not scores:
            return None
        best = max(scores, key=scores.__getitem__)
        logger.info("expert_disagreement: %s (score %.4f of %d image(s))", best, scores[best], len(scores))
        return {"id": best, "score": scores[best], "scores": scores, "skipped": skipped}

    def _score(self, path: Path) -> float:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, self.weights.describe()["sha256"])
        if key not in self._scores:
            array, affine, _ = load_volume(path)
            result = self.segmenter.expert_disagreement(array, affine, guess_modality(path), path.name)
            self._scores[key] = result["score"]
        return self._scores[key]
