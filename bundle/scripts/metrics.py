"""Segmentation metrics for binary lesion masks: Dice, lesion volumes and lesion-wise detection.

Conventions (chosen so that every case yields a number and empty cases are neither dropped nor undefined):

* Any non-zero voxel is lesion.
* Dice: both masks empty -> 1.0 (nothing to find, nothing predicted); exactly one empty -> 0.0.
* Lesions are 3-D connected components with 26-connectivity (voxels touching by a face, an edge or a corner belong
  to the same lesion). A true lesion is *detected* when any predicted voxel lies in it; a predicted lesion is a *true
  positive* when any true voxel lies in it.
* Lesion precision = true-positive predicted lesions / predicted lesions, recall = detected true lesions / true
  lesions, F1 = 2PR / (P + R). No true and no predicted lesions -> precision = recall = F1 = 1.0; a ratio with an
  empty denominator otherwise (one side empty) -> 0.0, and F1 = 0.0 when P + R = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "BRATS_REGIONS",
    "brats_region_dice",
    "connected_components",
    "dice",
    "lesion_detection",
    "lesion_metrics",
    "lesion_summary",
    "summarise",
]

SUMMARY_METRICS = ("dice", "abs_volume_error_ml", "lesion_f1")
# BraTS evaluation regions over the sub-region labels 1 necrotic core, 2 oedema, 3 enhancing tumour.
BRATS_REGIONS = {"whole_tumour": (1, 2, 3), "tumour_core": (1, 3), "enhancing_tumour": (3,)}


def _binary(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask) != 0


def _check_shapes(prediction: np.ndarray, truth: np.ndarray) -> None:
    if np.shape(prediction) != np.shape(truth):
        raise ValueError(f"prediction shape {np.shape(prediction)} != truth shape {np.shape(truth)}.")


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary masks; 1.0 when both are empty, 0.0 when exactly one is."""
    _check_shapes(prediction, truth)
    pred, true = _binary(prediction), _binary(truth)
    total = int(pred.sum()) + int(true.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, true).sum()) / total


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the 26-connected (fully connected) components of a 2-D or 3-D binary mask with ITK.

    Returns:
        The uint32 label array (0 background, 1..n components, same shape as ``mask``) and the number of components.
    """
    import itk

    binary = np.ascontiguousarray(_binary(mask), dtype=np.uint8)
    if binary.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D mask, got shape {binary.shape}.")
    if not binary.any():
        return np.zeros(binary.shape, dtype=np.uint32), 0
    image = itk.GetImageFromArray(binary)
    output_type = itk.Image[itk.UL, binary.ndim]
    labeller = itk.ConnectedComponentImageFilter[type(image), output_type].New(image, FullyConnected=True)
    labeller.Update()
    # ITK's unsigned long labels are uint64, which numpy < 2 cannot bincount (no safe cast to intp)
    labels = np.asarray(itk.GetArrayFromImage(labeller.GetOutput()), dtype=np.uint32)
    return labels, int(labeller.GetObjectCount())


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in mL of a 4 x 4 voxel-to-mm affine (|det| of its 3 x 3 part / 1000)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def lesion_summary(labels: np.ndarray, voxel_volume_ml: float) -> dict[str, Any]:
    """Lesion volume (mL), count and largest lesion (mL) of a label map (26-connected components) for reports."""
    components, count = connected_components(labels)
    sizes = np.bincount(components.ravel())[1:] if count else np.zeros(0, dtype=int)
    return {
        "lesion_volume_ml": round(float(_binary(labels).sum() * voxel_volume_ml), 3),
        "lesion_count": int(count),
        "largest_lesion_ml": round(float(sizes.max() * voxel_volume_ml), 3) if count else 0.0,
    }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def lesion_detection(prediction: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Lesion-wise detection counts, precision, recall and F1 (see the module docstring for the conventions)."""
    _check_shapes(prediction, truth)
    pred, true = _binary(prediction), _binary(truth)
    true_labels, n_true = connected_components(true)
    pred_labels, n_pred = connected_components(pred)
    detected_true = int(np.count_nonzero(np.unique(true_labels[pred])))
    true_positive_pred = int(np.count_nonzero(np.unique(pred_labels[true])))
    if n_true == 0 and n_pred == 0:
        precision = recall = f1 = 1.0
    else:
        precision, recall = _ratio(true_positive_pred, n_pred), _ratio(detected_true, n_true)
        f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "n_lesions_true": n_true,
        "n_lesions_pred": n_pred,
        "detected_true": detected_true,
        "true_positive_pred": true_positive_pred,
        "lesion_precision": precision,
        "lesion_recall": recall,
        "lesion_f1": f1,
    }


def lesion_metrics(prediction: np.ndarray, truth: np.ndarray, voxel_volume_ml: float) -> dict[str, Any]:
    """All per-case metrics of a binary prediction against a binary ground truth on the same grid.

    Args:
        prediction: predicted mask; any non-zero voxel is lesion.
        truth: ground-truth mask of the same shape; any non-zero voxel is lesion.
        voxel_volume_ml: volume of one voxel in millilitres (product of the spacings in mm / 1000).

    Returns:
        ``dice``, ``volume_pred_ml``, ``volume_true_ml``, ``volume_error_ml`` (pred - true, signed),
        ``abs_volume_error_ml`` and the lesion-wise entries of :func:`lesion_detection`.
    """
    if not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}.")
    _check_shapes(prediction, truth)
    volume_pred = int(np.count_nonzero(prediction)) * float(voxel_volume_ml)
    volume_true = int(np.count_nonzero(truth)) * float(voxel_volume_ml)
    return {
        "dice": dice(prediction, truth),
        "volume_pred_ml": volume_pred,
        "volume_true_ml": volume_true,
        "volume_error_ml": volume_pred - volume_true,
        "abs_volume_error_ml": abs(volume_pred - volume_true),
        **lesion_detection(prediction, truth),
    }


def _means(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(cases), **{name: float(np.mean([case[name] for case in cases])) for name in SUMMARY_METRICS}}


def summarise(per_case: Sequence[dict[str, Any]], key: str = "modality") -> dict[str, Any]:
    """Means of Dice, absolute volume error (mL) and lesion F1 per group of cases and overall.

    Args:
        per_case: one dict per case holding at least the :data:`SUMMARY_METRICS` (as from :func:`lesion_metrics`).
        key: the case entry to group by; cases without it (or with ``None``) form the group ``"unknown"``.

    Returns:
        ``{"groups": {name: {"n", "dice", "abs_volume_error_ml", "lesion_f1"}}, "overall": {...}}``; groups keep
        the order of first appearance. ``overall`` holds the means over all cases plus ``mean_of_group_means``,
        the unweighted mean of the group means (every group counts once, whatever its size).
    """
    if not per_case:
        raise ValueError("no cases to summarise.")
    grouped: dict[str, list[dict[str, Any]]] = {}
    for case in per_case:
        grouped.setdefault(str(case.get(key) or "unknown"), []).append(case)
    groups = {name: _means(cases) for name, cases in grouped.items()}
    group_means = {name: float(np.mean([g[name] for g in groups.values()])) for name in SUMMARY_METRICS}
    overall = {**_means(per_case), "mean_of_group_means": {"n_groups": len(groups), **group_means}}
    return {"groups": groups, "overall": overall}


def brats_region_dice(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of the BraTS regions (``dice_whole_tumour``, ``dice_tumour_core``, ``dice_enhancing_tumour``) and their
    mean ``dice_regions``; a region absent from both prediction and truth scores 1."""
    _check_shapes(prediction, truth)
    out = {}
    for region, labels in BRATS_REGIONS.items():
        p, t = np.isin(prediction, labels), np.isin(truth, labels)
        total = int(p.sum()) + int(t.sum())
        out[f"dice_{region}"] = 1.0 if total == 0 else 2.0 * float((p & t).sum()) / total
    out["dice_regions"] = float(np.mean(list(out.values())))
    return out
