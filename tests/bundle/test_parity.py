"""Equivalence with the authors' code: outputs of their nnU-Net predictor on their checkpoint format.

Tolerances: tile logits have no rounding upstream, so fp32 must match within 1e-4 (max abs). They are compared on
PyTorch's native convolution path: the reference itself is 4.6e-5 away from a float64 evaluation, and oneDNN's
blocked accumulation adds another ~5e-5 on some CPUs, which would leave no margin. The reference sliding
window accumulated in float16 (as upstream on CPU); float32 accumulation of the same tiles differs by at most 0.036
(fixture calibration), float16 accumulation must reproduce it to within one float16 ulp at |logit| <= 32.
"""

from __future__ import annotations

import pytest
import torch
from upstream_factory import plans_v22, plans_v24, reference_mome, write_checkpoint_set

from scripts.convert_upstream import convert
from scripts.inferers import NNUNetSlidingWindowInferer, mirror_tta


def test_tile_logits_without_tta(converted_network, reference_outputs):
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        logits = converted_network(reference_outputs["tile_input"])
    assert (logits - reference_outputs["tile_logits_no_tta"]).abs().max() < 1e-4


def test_tile_logits_with_mirroring_tta(converted_network, reference_outputs):
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        logits = mirror_tta(converted_network, reference_outputs["tile_input"], (0, 1, 2))
    assert (logits - reference_outputs["tile_logits_tta"]).abs().max() < 1e-4


@pytest.mark.parametrize("accumulate_dtype, max_abs", [("float32", 0.05), ("float16", 0.0157)])
def test_sliding_window_logits(converted_network, reference_outputs, accumulate_dtype, max_abs):
    reference = reference_outputs["sliding_window_logits_no_tta"].float()
    inferer = NNUNetSlidingWindowInferer((32, 32, 32), tile_step=0.5, accumulate_dtype=accumulate_dtype)
    with torch.no_grad():
        logits = inferer(reference_outputs["image"][None], converted_network)[0]
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max() <= max_abs
    assert (logits.argmax(0) == reference.argmax(0)).float().mean() >= 0.9999


PLAN_VARIANTS = {
    "5-stage-anisotropic-noncubic": (
        plans_v22(
            features=[8, 16, 32, 32, 32],
            kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 2]],
            n_enc=[2, 2, 2, 2, 2],
            n_dec=[2, 2, 2, 2],
            patch=[16, 32, 48],
        ),
        {"background": 0, "abnormal": 1},
        5,
        None,
    ),
    "3-stage-3-experts-3-classes-nnunet2.4-plans": (
        plans_v24(
            features=[6, 12, 24],
            kernels=[[3, 3, 3]] * 3,
            strides=[[1, 1, 1], [2, 2, 2], [2, 2, 1]],
            n_enc=[1, 2, 3],
            n_dec=[1, 2],
            patch=[24, 16, 20],
        ),
        {"background": 0, "edema": 1, "core": 2},
        3,
        "t1,t2,flair",
    ),
}


@pytest.mark.parametrize("variant", sorted(PLAN_VARIANTS))
def test_other_plans_convert_and_match_a_functional_reference(tmp_path, variant):
    plans, labels, n_experts, modalities = PLAN_VARIANTS[variant]
    weights = write_checkpoint_set(tmp_path / "src", plans, labels, n_experts, seed=7)
    names = modalities.split(",") if modalities else None
    bundle = convert(tmp_path / "src", tmp_path / "bundle", modalities=names)

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    patch = plans["configurations"].get("base", plans["configurations"]["3d_fullres"])["patch_size"]
    assert parser["patch_size"] == patch
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = network.eval()(x)
        theirs = reference_mome(weights, plans, x, len(labels))
    assert ours.shape == (1, len(labels), *patch)
    assert (ours - theirs).abs().max() < 1e-4
