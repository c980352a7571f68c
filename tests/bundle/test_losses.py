"""MoME loss: nnU-Net deep-supervision weights, curriculum weights, per-sample routing of the expert loss."""

from __future__ import annotations

import pytest
import torch

from scripts.losses import MoMELoss, curriculum_weight, deep_supervision_weights, nnunet_deep_supervision_loss


def test_deep_supervision_weights_match_nnunet():
    assert deep_supervision_weights(5) == pytest.approx([0.5333333, 0.2666667, 0.1333333, 0.0666667, 0.0])
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


@pytest.mark.parametrize(
    ("r", "exponent", "expected"),
    [(0.0, 2, 1.0), (0.5, 2, 0.25), (1.0, 2, 0.0), (0.0, 3, 1.0), (0.5, 3, 0.125), (1.0, 3, 0.0)],
)
def test_curriculum_weight(r, exponent, expected):
    assert curriculum_weight(r, exponent) == pytest.approx(expected)


def test_curriculum_rejects_progress_outside_unit_interval():
    with pytest.raises(ValueError, match="progress"):
        curriculum_weight(1.5, 2)


def _outputs(num_experts: int = 3, batch: int = 2, size: int = 8, levels: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def pyramid():
        return [
            torch.randn(batch, 2, *(size // 2**i,) * 3, generator=generator).requires_grad_() for i in range(levels)
        ]

    return {"fused": pyramid(), "experts": [pyramid() for _ in range(num_experts)]}


def _target(batch: int = 2, size: int = 8) -> torch.Tensor:
    target = torch.zeros(batch, 1, size, size, size)
    target[:, :, 2:6, 2:6, 2:6] = 1
    return target


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_loss_is_the_curriculum_mix_of_expert_and_fused_terms(r):
    outputs, target = _outputs(), _target()
    terms = MoMELoss(levels=3, curriculum_exponent=2)(outputs, target, torch.tensor([0, 2]), r)
    weight = (1 - r) ** 2
    assert float(terms["weight"]) == pytest.approx(weight)
    expected = weight * terms["expert"] + (1 - weight) * terms["fused"]
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-6)


def test_expert_loss_is_routed_per_sample_by_modality():
    outputs, target = _outputs(), _target()
    ds = nnunet_deep_supervision_loss(3)
    loss = MoMELoss(levels=3)
    routed = loss.expert_loss(outputs["experts"], target, torch.tensor([2, 0]))
    expected = ds([lv[0:1] for lv in outputs["experts"][2]], target[0:1])
    expected = expected + ds([lv[1:2] for lv in outputs["experts"][0]], target[1:2])
    assert float(routed) == pytest.approx(float(expected), rel=1e-6)  # summed over the batch, as upstream

    # Gradients reach only the routed expert and only through its own sample.
    routed.backward()
    for k, levels in enumerate(outputs["experts"]):
        grad = levels[0].grad
        sample_has_grad = [bool(grad is not None and grad[b].abs().sum() > 0) for b in range(2)]
        assert sample_has_grad == [k == 2, k == 0], f"expert {k}"


def test_unknown_modality_samples_only_feed_the_fused_loss():
    outputs, target = _outputs(), _target()
    loss = MoMELoss(levels=3, expert_reduction="mean")
    ds = nnunet_deep_supervision_loss(3)
    only_second = loss.expert_loss(outputs["experts"], target, torch.tensor([-1, 1]))
    expected = ds([lv[1:2] for lv in outputs["experts"][1]], target[1:2])
    assert float(only_second) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss.expert_loss(outputs["experts"], target, torch.tensor([-1, -1]))) == 0.0
    with pytest.raises(ValueError, match="routed to expert 7"):
        loss.expert_loss(outputs["experts"], target, torch.tensor([7, 0]))


def test_expert_reduction_sum_scales_with_batch_and_mean_does_not():
    outputs, target = _outputs(), _target()
    index = torch.tensor([1, 1])
    summed = MoMELoss(3, expert_reduction="sum").expert_loss(outputs["experts"], target, index)
    mean = MoMELoss(3, expert_reduction="mean").expert_loss(outputs["experts"], target, index)
    assert float(summed) == pytest.approx(2 * float(mean), rel=1e-6)
    with pytest.raises(ValueError):
        MoMELoss(3, expert_reduction="max")


def test_gate_routing_penalty_is_the_mean_square_of_off_modality_weights():
    from scripts.losses import gate_routing_penalty

    num_experts, classes, levels = 3, 2, 3
    weights = []
    for i in range(levels):
        level = torch.zeros(2, num_experts * classes, *(8 // 2**i,) * 3)
        for k in range(num_experts):
            level[:, classes * k : classes * (k + 1)] = k + 1.0  # expert k weighted by k + 1 everywhere
        weights.append(level)
    level_weights = deep_supervision_weights(levels)
    # sample 0 matches expert 1 (off: weights 1 and 3 -> mean square 5); sample 1 is of unknown modality (skipped)
    penalty = gate_routing_penalty(weights, torch.tensor([1, -1]), num_experts, level_weights)
    assert float(penalty) == pytest.approx(5.0 * sum(level_weights))
    routed = [w.clone() for w in weights]
    for level in routed:
        level[0, :2], level[0, 4:] = 0.0, 0.0  # only the matching expert weighted
    assert float(gate_routing_penalty(routed, torch.tensor([1, -1]), num_experts, level_weights)) == 0.0
    assert float(gate_routing_penalty(weights, torch.tensor([-1, -1]), num_experts, level_weights)) == 0.0


def test_routing_weight_adds_the_penalty_and_zero_is_the_authors_loss():
    outputs = _outputs()
    generator = torch.Generator().manual_seed(1)
    outputs["weights"] = [torch.randn(2, 6, *(8 // 2**i,) * 3, generator=generator) for i in range(3)]
    target = (torch.rand(2, 1, 8, 8, 8, generator=generator) > 0.7).float()
    experts = torch.tensor([0, 2])
    plain = MoMELoss(3, 2.0)(outputs, target, experts, 0.5)
    routed = MoMELoss(3, 2.0, routing_weight=0.1)(outputs, target, experts, 0.5)
    assert "routing" not in plain and float(routed["routing"]) > 0
    assert float(routed["loss"]) == pytest.approx(float(plain["loss"]) + 0.1 * float(routed["routing"]), rel=1e-5)
    with pytest.raises(ValueError, match="routing_weight"):
        MoMELoss(3, routing_weight=-1.0)


def test_modality_classifier_cross_entropy_skips_unknown_samples():
    outputs = _outputs()
    outputs["weights"] = [torch.zeros(2, 6, *(8 // 2**i,) * 3) for i in range(3)]
    target = torch.zeros(2, 1, 8, 8, 8)
    without = MoMELoss(3)(outputs, target, torch.tensor([2, -1]), 0.5)
    outputs["modality_logits"] = torch.tensor([[0.0, 1.0, 2.0], [9.0, 0.0, 0.0]])
    terms = MoMELoss(3, modality_weight=0.5)(outputs, target, torch.tensor([2, -1]), 0.5)
    expected = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([2]))
    assert float(terms["modality"]) == pytest.approx(float(expected))
    assert float(terms["loss"]) == pytest.approx(float(without["loss"]) + 0.5 * float(expected), rel=1e-5)
    assert "modality" not in without
