"""MoME losses: nnU-Net's Dice + CE with deep supervision, the curriculum and the modality-routed expert loss.

Spec: ``mome-method.md`` section 6.3. The fused loss ``L2`` supervises the gate-weighted fusion at every decoder
level; the expert loss ``L1`` supervises, for each sample, only the expert of that sample's modality; the curriculum
moves the weight from ``L1`` to ``L2`` over training: ``L = (1 - r)^p * L1 + (1 - (1 - r)^p) * L2`` with
``r = epoch / epochs``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

__all__ = [
    "MoMELoss",
    "MoMEPlusLoss",
    "UNKNOWN_MODALITY",
    "curriculum_weight",
    "deep_supervision_weights",
    "nnunet_dice_ce",
    "nnunet_deep_supervision_loss",
]

UNKNOWN_MODALITY = -1


def deep_supervision_weights(levels: int) -> List[float]:
    """nnU-Net's weights for ``levels`` outputs (high -> low resolution): 1/2^i, the lowest set to 0, normalised.

    For 5 levels: ``[0.5333, 0.2667, 0.1333, 0.0667, 0.0]``; a single level gets weight 1.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}.")
    if levels == 1:
        return [1.0]
    raw = [0.5**i for i in range(levels)]
    raw[-1] = 0.0
    total = sum(raw)
    return [w / total for w in raw]


def nnunet_dice_ce() -> DiceCELoss:
    """nnU-Net's ``DC_and_CE_loss``: softmax soft Dice per sample without background (smooth 1e-5) + CE, 1:1.

    MONAI's Dice term is ``1 - Dice`` where nnU-Net's is ``-Dice``; the constant does not change any gradient.
    """
    return DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        batch=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        lambda_dice=1.0,
        lambda_ce=1.0,
    )


def nnunet_deep_supervision_loss(levels: int) -> DeepSupervisionLoss:
    """Dice + CE over ``levels`` deep-supervision outputs with nnU-Net's weights; targets downsampled (nearest)."""
    return DeepSupervisionLoss(nnunet_dice_ce(), weights=deep_supervision_weights(levels))


def curriculum_weight(r: float, exponent: float) -> float:
    """Weight of the expert loss at training progress ``r`` in [0, 1]: ``(1 - r)^p``."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"training progress r must lie in [0, 1], got {r}.")
    return (1.0 - r) ** exponent


class MoMELoss(nn.Module):
    """The MoME training loss for a batch.

    Args:
        levels: deep-supervision outputs per network.
        curriculum_exponent: ``p`` of the curriculum (2 in the authors' current code, 3 in the MICCAI-era code).
        expert_reduction: ``"sum"`` adds the per-sample expert losses over the batch as the authors do (so ``L1``
            scales with the batch size); ``"mean"`` averages them over the samples that have a known modality.
        routing_weight: weight ``lambda`` of an optional gate routing prior (our extension; 0, the default, is the
            authors' loss): ``lambda * sum_i w_i * mean(W_i[b, k != m_b]^2)``, the deep-supervision-weighted mean
            square of the gate weights the gate gives to the experts that do not match each sample's modality
            (see :func:`gate_routing_penalty`). It teaches the gate to recognise the contrast from the image, which
            short CPU schedules otherwise do not: the demo's gate gave T2 and FLAIR inputs the same weights.
        modality_weight: weight of the cross-entropy of MoME's optional modality classifier
            (``MoME(modality_classifier=True)``, whose training output has ``modality_logits``) against each
            sample's modality; unknown-modality samples are skipped. Ignored without a classifier.
        replicas: data-parallel replicas the batch is split over (DDP world size). The summed expert loss of each
            replica's share is multiplied by it, so that DDP's averaging of the replicas' gradients gives the gradient
            of the whole batch's sum, as in one process. The other terms are means over the batch and need nothing.

    Call with the training output of :class:`scripts.networks.MoME` (``fused``, ``experts``, ``weights``), the
    target ``(B, 1, ...)``, the per-sample expert index ``(B,)`` (``-1`` = unknown modality: the sample then
    contributes to the fused loss only) and the progress ``r``. Returns a dict with ``loss``, ``fused``, ``expert``
    and ``weight`` (the curriculum weight of the expert loss), ``routing`` when ``routing_weight > 0`` and
    ``modality`` (the classifier's cross-entropy) with a modality classifier.
    """

    def __init__(
        self,
        levels: int,
        curriculum_exponent: float = 2.0,
        expert_reduction: str = "sum",
        routing_weight: float = 0.0,
        modality_weight: float = 1.0,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        if expert_reduction not in ("sum", "mean"):
            raise ValueError(f"expert_reduction must be 'sum' or 'mean', got {expert_reduction!r}.")
        if routing_weight < 0:
            raise ValueError(f"routing_weight must be >= 0, got {routing_weight}.")
        self.deep_supervision = nnunet_deep_supervision_loss(levels)
        self.level_weights = deep_supervision_weights(levels)
        self.curriculum_exponent = curriculum_exponent
        self.expert_reduction = expert_reduction
        self.routing_weight = float(routing_weight)
        self.modality_weight = float(modality_weight)
        self.replicas = int(replicas)

    def expert_loss(
        self, experts: Sequence[Sequence[torch.Tensor]], target: torch.Tensor, expert_index: torch.Tensor
    ) -> torch.Tensor:
        """``sum_b L_DS(E_{m_b}(x_b), y_b)`` over the samples with a known modality (or their mean)."""
        terms = []
        for b, k in enumerate(expert_index.tolist()):
            if k == UNKNOWN_MODALITY:
                continue
            if not 0 <= k < len(experts):
                raise ValueError(f"sample {b} is routed to expert {k}, but there are {len(experts)} experts.")
            terms.append(self.deep_supervision([level[b : b + 1] for level in experts[k]], target[b : b + 1]))
        if not terms:
            return target.new_zeros((), dtype=torch.float32)
        total = torch.stack(terms).sum()
        return total / len(terms) if self.expert_reduction == "mean" else total * self.replicas

    def forward(
        self, outputs: Dict[str, list], target: torch.Tensor, expert_index: torch.Tensor, r: float
    ) -> Dict[str, torch.Tensor]:
        weight = curriculum_weight(r, self.curriculum_exponent)
        fused = self.deep_supervision(outputs["fused"], target)
        expert = self.expert_loss(outputs["experts"], target, expert_index)
        loss = weight * expert + (1.0 - weight) * fused
        terms = {"fused": fused.detach(), "expert": expert.detach(), "weight": torch.tensor(weight)}
        if self.routing_weight > 0:
            experts = len(outputs["experts"])
            routing = gate_routing_penalty(outputs["weights"], expert_index, experts, self.level_weights)
            loss = loss + self.routing_weight * routing
            terms["routing"] = routing.detach()
        if "modality_logits" in outputs:
            known = expert_index.to(outputs["modality_logits"].device) != UNKNOWN_MODALITY
            logits = outputs["modality_logits"][known].float()
            modality = nn.functional.cross_entropy(logits, expert_index.to(logits.device)[known]) if len(logits) else 0
            loss = loss + self.modality_weight * modality
            terms["modality"] = torch.as_tensor(modality).detach()
        return {"loss": loss, **terms}


def gate_routing_penalty(
    weights: Sequence[torch.Tensor], expert_index: torch.Tensor, num_experts: int, level_weights: Sequence[float]
) -> torch.Tensor:
    """Mean square of the gate weights on experts that do not match each sample's modality, over levels.

    Args:
        weights: the gate's per-level maps ``(B, K * C, ...)``, high -> low resolution.
        expert_index: ``(B,)`` matching expert per sample; ``-1`` (unknown modality) samples are skipped.
        num_experts: ``K``.
        level_weights: deep-supervision weight of each level (levels with weight 0 are skipped).

    Returns:
        ``sum_i level_weights[i] * mean_b mean_{k != m_b, c, voxels} W_i[b, k, c]^2`` (0 when no sample is known).
    """
    known = [b for b, k in enumerate(expert_index.tolist()) if k != UNKNOWN_MODALITY]
    total = weights[0].new_zeros((), dtype=torch.float32)
    if not known or num_experts < 2:
        return total
    rows = torch.tensor(known, device=weights[0].device)
    off = torch.ones(len(known), num_experts, dtype=torch.bool, device=weights[0].device)
    off[torch.arange(len(known)), expert_index.to(weights[0].device)[rows]] = False
    for level, factor in zip(weights, level_weights):
        if factor == 0:
            continue
        per_expert = level[rows].float().unflatten(1, (num_experts, -1)).pow(2).flatten(2).mean(2)  # (b, K)
        total = total + factor * per_expert[off].mean()
    return total


class MoMEPlusLoss(nn.Module):
    """The MoME+ training loss for a batch (``mome-method.md`` section 8.4).

    The expert loss of a sample is the mean deep-supervision loss over the experts of its *available* modalities
    (an expert whose modality is missing sees a synthesised channel and is not supervised); per-sample expert
    losses are summed over the batch (``"sum"``, as upstream) or averaged (``"mean"``). Unlike the authors' code as
    committed, where the curriculum is computed and then overwritten by the fused loss, the curriculum is applied:
    ``L = (1 - r)^p * L1 + (1 - (1 - r)^p) * L2``. ``curriculum=False`` reproduces the committed behaviour
    (fused loss only). ``replicas``: see :class:`MoMELoss`.

    Call with the training output of :class:`scripts.networks.MoMEPlus` (``fused``, ``experts``,
    ``availability``), the target ``(B, 1, ...)`` and the progress ``r``. Returns ``loss``, ``fused``, ``expert``
    and ``weight`` like :class:`MoMELoss`.
    """

    def __init__(
        self,
        levels: int,
        curriculum_exponent: float = 2.0,
        expert_reduction: str = "sum",
        curriculum: bool = True,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        if expert_reduction not in ("sum", "mean"):
            raise ValueError(f"expert_reduction must be 'sum' or 'mean', got {expert_reduction!r}.")
        self.deep_supervision = nnunet_deep_supervision_loss(levels)
        self.curriculum_exponent = curriculum_exponent
        self.expert_reduction = expert_reduction
        self.curriculum = curriculum
        self.replicas = int(replicas)

    def expert_loss(
        self, experts: Sequence[Sequence[torch.Tensor]], target: torch.Tensor, availability: torch.Tensor
    ) -> torch.Tensor:
        """``sum_b mean_{k available in b} L_DS(E_k(S_b), y_b)`` (or the mean over samples)."""
        if availability.shape != (target.shape[0], len(experts)):
            raise ValueError(
                f"availability {tuple(availability.shape)} does not match {target.shape[0]} samples x "
                f"{len(experts)} experts."
            )
        per_sample = []
        for b, row in enumerate(availability.tolist()):
            available = [k for k, flag in enumerate(row) if flag > 0]
            if not available:
                raise ValueError(f"sample {b} has no available modality.")
            terms = [
                self.deep_supervision([level[b : b + 1] for level in experts[k]], target[b : b + 1]) for k in available
            ]
            per_sample.append(torch.stack(terms).mean())
        total = torch.stack(per_sample).sum()
        return total / len(per_sample) if self.expert_reduction == "mean" else total * self.replicas

    def forward(self, outputs: Dict[str, list], target: torch.Tensor, r: float) -> Dict[str, torch.Tensor]:
        weight = curriculum_weight(r, self.curriculum_exponent) if self.curriculum else 0.0
        fused = self.deep_supervision(outputs["fused"], target)
        expert = self.expert_loss(outputs["experts"], target, outputs["availability"])  # type: ignore[arg-type]
        loss = weight * expert + (1.0 - weight) * fused
        return {"loss": loss, "fused": fused.detach(), "expert": expert.detach(), "weight": torch.tensor(weight)}
