"""Lesion metrics on hand-built masks: Dice, volumes, 26-connected components, lesion-wise F1 and the summary."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.metrics import connected_components, dice, lesion_metrics, summarise


def empty(shape: tuple[int, ...] = (8, 9, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_dice_and_volumes_of_overlapping_boxes():
    truth, prediction = empty(), empty()
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels
    prediction[1:3, 1:3, 1:4] = 2  # 12 voxels, 8 shared; any non-zero value is lesion
    metrics = lesion_metrics(prediction, truth, voxel_volume_ml=0.5)
    assert metrics["dice"] == pytest.approx(2 * 8 / (8 + 12))
    assert metrics["volume_true_ml"] == pytest.approx(4.0)
    assert metrics["volume_pred_ml"] == pytest.approx(6.0)
    assert metrics["volume_error_ml"] == pytest.approx(2.0)
    assert metrics["abs_volume_error_ml"] == pytest.approx(2.0)
    assert lesion_metrics(truth, prediction, 0.5)["volume_error_ml"] == pytest.approx(-2.0)


def test_dice_empty_conventions():
    lesion = empty()
    lesion[2, 2, 2] = 1
    assert dice(empty(), empty()) == 1.0
    assert dice(lesion, empty()) == 0.0
    assert dice(empty(), lesion) == 0.0
    assert dice(lesion, lesion) == 1.0


def test_diagonal_touching_voxels_are_one_lesion():
    mask = empty()
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = 1  # corner-to-corner chain: one 26-connected lesion
    mask[6, 1, 1] = mask[7, 2, 1] = 1  # edge contact: a second lesion
    mask[1, 6, 8] = 1  # isolated: a third
    labels, count = connected_components(mask)
    assert count == 3
    assert labels.shape == mask.shape and labels.dtype == np.uint32  # numpy < 2 (MONAI Label's) cannot bincount uint64
    assert labels[1, 1, 1] == labels[2, 2, 2] == labels[3, 3, 3] != 0
    assert labels[6, 1, 1] == labels[7, 2, 1] not in (0, labels[1, 1, 1])
    assert len(np.unique(labels[mask != 0])) == 3


def test_lesion_detection_counts_and_f1():
    truth, prediction = empty((10, 10, 10)), empty((10, 10, 10))
    truth[0:2, 0:2, 0:2] = 1  # true lesion A, hit
    truth[4:8, 4:8, 4:8] = 1  # true lesion B, hit by two separate predicted lesions
    truth[0, 9, 9] = 1  # true lesion C, missed
    prediction[1, 1, 1] = 1  # hits A
    prediction[4, 4, 4] = 1  # hits B
    prediction[7, 7, 6:10] = 1  # hits B and sticks out of it: still one predicted lesion
    prediction[9, 0, 0] = 1  # false positive
    metrics = lesion_metrics(prediction, truth, 1e-3)
    assert metrics["n_lesions_true"] == 3
    assert metrics["n_lesions_pred"] == 4
    assert metrics["detected_true"] == 2
    assert metrics["true_positive_pred"] == 3
    precision, recall = 3 / 4, 2 / 3
    assert metrics["lesion_precision"] == pytest.approx(precision)
    assert metrics["lesion_recall"] == pytest.approx(recall)
    assert metrics["lesion_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


@pytest.mark.parametrize(
    ("pred_voxel", "true_voxel", "expected"),
    [
        (False, False, (1.0, 1.0, 1.0)),  # nothing to find, nothing found
        (True, False, (0.0, 0.0, 0.0)),  # only false positives
        (False, True, (0.0, 0.0, 0.0)),  # only misses
    ],
)
def test_lesion_detection_empty_conventions(pred_voxel, true_voxel, expected):
    prediction, truth = empty(), empty()
    prediction[3, 3, 3] = pred_voxel
    truth[5, 5, 5] = true_voxel
    metrics = lesion_metrics(prediction, truth, 1.0)
    assert (metrics["lesion_precision"], metrics["lesion_recall"], metrics["lesion_f1"]) == expected
    assert metrics["n_lesions_pred"] == int(pred_voxel) and metrics["n_lesions_true"] == int(true_voxel)


def test_shape_mismatch_and_bad_voxel_volume_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(empty((4, 4, 4)), empty((4, 4, 5)), 1.0)
    with pytest.raises(ValueError, match="positive"):
        lesion_metrics(empty(), empty(), 0.0)


def test_summarise_groups_and_means():
    cases = [
        {"modality": "flair", "dice": 0.8, "abs_volume_error_ml": 1.0, "lesion_f1": 1.0},
        {"modality": "flair", "dice": 0.6, "abs_volume_error_ml": 3.0, "lesion_f1": 0.5},
        {"modality": "t1", "dice": 0.2, "abs_volume_error_ml": 5.0, "lesion_f1": 0.0},
        {"dice": 1.0, "abs_volume_error_ml": 0.0, "lesion_f1": 1.0},
    ]
    summary = summarise(cases)
    assert list(summary["groups"]) == ["flair", "t1", "unknown"]
    flair = summary["groups"]["flair"]
    assert flair["n"] == 2
    assert flair["dice"] == pytest.approx(0.7)
    assert flair["abs_volume_error_ml"] == pytest.approx(2.0)
    assert flair["lesion_f1"] == pytest.approx(0.75)
    overall = summary["overall"]
    assert overall["n"] == 4
    assert overall["dice"] == pytest.approx(2.6 / 4)
    assert overall["abs_volume_error_ml"] == pytest.approx(9.0 / 4)
    macro = overall["mean_of_group_means"]
    assert macro["n_groups"] == 3
    assert macro["dice"] == pytest.approx((0.7 + 0.2 + 1.0) / 3)
    assert macro["lesion_f1"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert list(summarise(cases, key="lesion_type")["groups"]) == ["unknown"]
    with pytest.raises(ValueError):
        summarise([])


def test_lesion_summary_for_reports():
    from scripts.metrics import lesion_summary

    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:5, 2:5, 2:5] = 1  # 27 voxels
    labels[10:12, 10:12, 10:12] = 1  # 8 voxels
    assert lesion_summary(labels, 0.002) == {"lesion_volume_ml": 0.07, "lesion_count": 2, "largest_lesion_ml": 0.054}
    assert lesion_summary(np.zeros((4, 4, 4)), 1.0) == {
        "lesion_volume_ml": 0.0,
        "lesion_count": 0,
        "largest_lesion_ml": 0.0,
    }
