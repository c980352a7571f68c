"""Fine-tuning a MoME on a few labelled native-space volumes (MONAI Label's train task, or any script).

The cases are prepared as inference prepares its input (:meth:`scripts.pipeline.MoMESegmenter.training_case`:
registration to the template, brain-masked MoME space), and the bundle's trainer (:class:`scripts.training.Trainer`,
the curriculum loss of the joint MoME stage) continues from the segmenter's current weights at a small learning
rate. The segmenter itself is not changed: the result is a new ``state_dict`` file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from .training import Trainer

__all__ = ["FineTuning", "fine_tune"]


@dataclass(frozen=True)
class FineTuning:
    """How long and how fast a fine-tuning run is (defaults: a few minutes on two CPU cores for the demo model).

    Args:
        epochs: epochs (the poly learning rate and the curriculum run over them).
        iterations_per_epoch: steps per epoch.
        learning_rate: initial learning rate (SGD, Nesterov momentum 0.99, as the bundle's training).
        batch_size: patches per step.
        seed: sampling seed.
    """

    epochs: int = 4
    iterations_per_epoch: int = 25
    learning_rate: float = 1e-4
    batch_size: int = 2
    seed: int = 0


def fine_tune(
    segmenter: Any, cases: Sequence[Dict[str, Any]], output_dir: Path, settings: FineTuning = FineTuning()
) -> tuple[Path, List[Dict[str, object]]]:
    """Trains a copy of ``segmenter.network`` (a :class:`scripts.pipeline.MoMESegmenter`) on ``cases``.

    Returns:
        The fine-tuned weights (``output_dir/model_final.pt``) and the per-epoch history.

    Raises:
        ValueError: no cases.
    """
    if not cases:
        raise ValueError("fine-tuning needs at least one labelled case.")
    network = copy.deepcopy(segmenter.network).float()
    optimizer = torch.optim.SGD(
        network.parameters(), lr=settings.learning_rate, momentum=0.99, nesterov=True, weight_decay=3e-5
    )
    trainer = Trainer.from_options(
        network, optimizer, list(cases), [], segmenter.patch_size, str(output_dir), segmenter.modalities,
        epochs=settings.epochs, iterations_per_epoch=settings.iterations_per_epoch, initial_lr=settings.learning_rate,
        batch_size=settings.batch_size, seed=settings.seed, device=segmenter.device, cpu_bf16=True, resume=False,
        progress=False,
    )  # fmt: skip
    history = trainer.run()
    return Path(output_dir) / "model_final.pt", history
