"""MoME / PlainConvUNet: release parameter counts, configurable sizes, fusion rule, TorchScript."""

from __future__ import annotations

import pytest
import torch

from scripts.networks import MoME, PlainConvUNet

RELEASE = {
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [3] * 6,
    "strides": [1, 2, 2, 2, 2, 2],
    "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5,
}
SMALL = {
    "features_per_stage": [4, 8, 12],
    "kernel_sizes": [[1, 3, 3], 3, 3],
    "strides": [1, [1, 2, 2], 2],
    "n_conv_per_stage": [1, 2, 1],
    "n_conv_per_stage_decoder": [1, 2],
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_configuration_parameter_counts():
    expert = PlainConvUNet(1, 2, **RELEASE)
    gate = PlainConvUNet(1 + 5 * 32, 5 * 2, **RELEASE)
    assert n_params(expert) == 31_195_594
    assert n_params(gate) == 31_340_274


def test_mome_sizes_come_from_configuration():
    model = MoME(num_experts=3, in_channels=2, num_classes=4, **SMALL)
    assert len(model.experts) == 3
    assert model.gate.encoder[0][0].conv.in_channels == 2 + 3 * 4
    assert model.gate.heads[-1].out_channels == 3 * 4
    assert model.size_divisor == (2, 4, 4)
    x = torch.randn(2, 2, 6, 12, 8)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 4, 6, 12, 8)


def test_train_outputs_follow_the_fusion_rule():
    torch.manual_seed(0)
    model = MoME(num_experts=3, in_channels=1, num_classes=2, **SMALL).train()
    out = model(torch.randn(1, 1, 4, 8, 8))
    assert [f.shape[2:] for f in out["fused"]] == [(4, 8, 8), (4, 4, 4)]
    assert len(out["experts"]) == 3 and all(len(levels) == 2 for levels in out["experts"])
    for level, weights in enumerate(out["weights"]):
        assert weights.shape[1] == 6
        expected = sum(out["experts"][k][level] * weights[:, 2 * k : 2 * k + 2] for k in range(3))
        torch.testing.assert_close(out["fused"][level], expected)


def test_eval_forward_equals_train_full_resolution_output():
    torch.manual_seed(1)
    model = MoME(num_experts=2, in_channels=1, num_classes=3, **SMALL)
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        train_fused = model.train()(x)["fused"][0]
        eval_fused = model.eval()(x)
    torch.testing.assert_close(eval_fused, train_fused)


def test_gate_input_includes_expert_stage0_features():
    """Changing one expert's stage-0 weights must change the gate's weights, not only that expert's logits."""
    torch.manual_seed(2)
    model = MoME(num_experts=2, in_channels=1, num_classes=2, **SMALL).eval()
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        _, before = model._run(x, None, False)
        model.experts[1].encoder[0][0].conv.bias += 1.0
        _, after = model._run(x, None, False)
    assert not torch.allclose(before[0], after[0])


def test_prior_at_the_bottleneck():
    torch.manual_seed(3)
    gate = PlainConvUNet(3, 4, prior_channels=2, **SMALL).eval()
    assert gate.upsample[0].in_channels == 12 + 2
    x = torch.randn(2, 3, 4, 8, 8)
    with torch.no_grad():
        a = gate.forward_features(x, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))[1][0]
        b = gate.forward_features(x, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))[1][0]
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="prior vector of 2 channels"):
        gate.forward_features(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"features_per_stage": [8]}, "at least 2 stages"),
        ({"kernel_sizes": [3, 3]}, "kernel_sizes needs 3 entries"),
        ({"strides": [1, 2, [2, 2]]}, "stride must be"),
        ({"n_conv_per_stage_decoder": [1]}, "n_conv_per_stage_decoder needs 2 entries"),
        ({"n_conv_per_stage": [1, 0, 1]}, "at least one convolution"),
    ],
    ids=["one-stage", "kernels", "stride-length", "decoder-convs", "zero-convs"],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlainConvUNet(1, 2, **{**SMALL, **kwargs})


def test_mome_rejects_zero_experts():
    with pytest.raises(ValueError, match="num_experts"):
        MoME(num_experts=0, in_channels=1, num_classes=2, **SMALL)


def test_torchscript_matches_eager():
    torch.manual_seed(4)
    model = MoME(num_experts=2, in_channels=1, num_classes=2, **SMALL).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_modality_classifier_routes_the_gate_weights_in_every_forward_path():
    torch.manual_seed(5)
    model = MoME(num_experts=3, in_channels=1, num_classes=2, modality_classifier=True, **SMALL)
    assert model.gate.prior_channels == 0 and model.classifier is not None and len(model.routing) == 2
    x = torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():
        for layer in model.routing:
            layer.weight.normal_()
        train = model.train()(x)
        assert train["modality_logits"].shape == (2, 3)
        eval_fused = model.eval()(x)
        torch.testing.assert_close(eval_fused, train["fused"][0])
        torch.testing.assert_close(model.forward_lean(x), eval_fused, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(model)(x), eval_fused)
        model.classifier.head[-1].bias.add_(torch.tensor([5.0, -5.0, 0.0]))  # another modality: other weights
        routed = model(x)
        assert not torch.allclose(routed, eval_fused)
        # the bias is per expert and class, the same at every voxel: with one expert's weights raised, the output
        # moves by that expert's logits
        experts = [levels[0] for levels in model._run(x, None, False)[0]]
        gate_input = torch.cat([x] + [expert.forward_features(x)[0][0] for expert in model.experts], 1)
        unrouted = model.fuse(experts, model.gate.forward_features(gate_input)[1][0])
        bias = model.routing[0](torch.softmax(model.classify(x), 1))[:, :, None, None, None]
        torch.testing.assert_close(routed - unrouted, model.fuse(experts, bias.expand(-1, -1, *x.shape[2:])))
    assert MoME(num_experts=3, in_channels=1, num_classes=2, **SMALL).classifier is None  # the authors' MoME


def test_modality_classifier_reads_intensity_levels_not_only_structure():
    torch.manual_seed(9)
    classifier = MoME(num_experts=2, in_channels=1, num_classes=2, modality_classifier=True, **SMALL).classifier
    x = torch.randn(1, 1, 4, 8, 8)
    quantiles = classifier.intensity_quantiles(torch.cat([x, 3 * x + 1]))
    assert quantiles.shape == (2, len(classifier.QUANTILES))
    torch.testing.assert_close(quantiles[1], 3 * quantiles[0] + 1)  # an affine intensity change is visible
    with torch.no_grad():
        classifier.head[-1].weight.normal_()
        assert not torch.allclose(classifier(x), classifier(3 * x + 1))


def test_plain_mome_weights_load_into_a_classifier_mome_unchanged(tmp_path):
    from scripts.training import load_extending

    torch.manual_seed(6)
    plain = MoME(num_experts=3, in_channels=1, num_classes=2, **SMALL).eval()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    extended = load_extending(MoME(3, 1, 2, modality_classifier=True, **SMALL), str(tmp_path / "plain.pt")).eval()
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(extended(x), plain(x))  # zero-initialised routing
    torch.save(MoME(2, 1, 2, **SMALL).state_dict(), tmp_path / "other.pt")
    with pytest.raises(KeyError, match="experts.2"):
        load_extending(MoME(3, 1, 2, modality_classifier=True, **SMALL), str(tmp_path / "other.pt"))


def test_shipped_demo_mome_names_the_contrast_and_routes_t2_to_the_t2_expert():
    """``models/model.pt`` matches ``inference.json``'s network strictly. On lesion tiles of unseen synthetic glioma
    subjects its classifier names the contrast (29 of 32 tiles at release, 8 subjects; here 4 subjects, >= 13 of 16),
    always T2, and the routing gives the T2 expert a lesion weight about 1 on T2 images and about 0.2 on the others
    (0.5.0 gave every contrast the same weights and failed T2)."""
    from pathlib import Path

    import numpy as np
    from monai.bundle import ConfigParser

    from scripts.synthetic import generate_subject, render

    bundle = Path(__file__).resolve().parents[2] / "bundle"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models/model.pt", map_location="cpu", weights_only=True), strict=True)
    network.eval()
    modalities = [str(m) for m in parser["modalities"]]
    t2_lesion_weight = 2 * modalities.index("t2") + 1
    named, weights = [], {"t2": [], "other": []}
    for seed in range(4):
        rng = np.random.default_rng([20261129, seed])
        subject = generate_subject(rng, 2.0, {"glioma": 1.0})
        centre = np.argwhere(subject.label > 0).mean(0)
        starts = [int(np.clip(round(c) - 24, 0, n - 48)) for c, n in zip(centre, subject.label.shape)]
        box = tuple(slice(start, start + 48) for start in starts)
        for modality in ("t1", "t1ce", "t2", "flair"):
            volume = render(subject, modality, rng)
            tile = torch.from_numpy((volume - volume.mean()) / volume.std())[box][None, None]
            with torch.inference_mode():
                named.append((modality, modalities[int(network.classify(tile).argmax())]))
                gate = network._run(tile, None, False)[1][0]
            weights["t2" if modality == "t2" else "other"].append(float(gate[0, t2_lesion_weight].mean()))
    assert sum(truth == guess for truth, guess in named) >= 13, named
    assert all(guess == "t2" for truth, guess in named if truth == "t2"), named
    assert min(weights["t2"]) > max(weights["other"]) + 0.5, weights
