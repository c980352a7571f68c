"""Inference profiles: parity is the nnU-Net tiler, fast is one whole-volume pass with fallbacks, memory-lean gate."""

from __future__ import annotations

import pytest
import torch

import scripts.profiles as profiles
from scripts.inferers import NNUNetSlidingWindowInferer
from scripts.networks import MoME
from scripts.profiles import ProfileInferer, cpu_has_native_bf16, tile_bytes

TOPOLOGY = {
    "features_per_stage": [4, 8, 16],
    "kernel_sizes": [3, 3, 3],
    "strides": [1, 2, 2],
    "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1],
}


def tiny_mome(prior: int = 0) -> MoME:
    torch.manual_seed(0)
    return MoME(num_experts=3, in_channels=1, num_classes=2, gate_prior_channels=prior, **TOPOLOGY).eval()


@pytest.fixture
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 1, 26, 30, 22)


@pytest.mark.parametrize("prior", [0, 2])
def test_memory_lean_gate_equals_concatenated_gate(prior):
    network = tiny_mome(prior)
    x = torch.randn(2, 1, 16, 24, 16)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :prior] if prior else None
    with torch.inference_mode():
        experts, weights = network._run(x, c, False)
        reference = network.fuse([levels[0] for levels in experts], weights[0])
        lean = network.forward_lean(x, c)
        default = network(x) if not prior else lean
    torch.testing.assert_close(lean, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default, lean)


def test_parity_is_the_nnunet_tiler_with_float16_accumulation(image):
    network = tiny_mome()
    expected = NNUNetSlidingWindowInferer((16, 16, 16), tile_step=0.5, accumulate_dtype="float16")(image, network)
    inferer = ProfileInferer("parity", roi_size=(16, 16, 16), sw_batch_size=1)
    with torch.inference_mode():
        result = inferer(image, network)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)
    assert inferer.describe()["tile_size"] == [16, 16, 16] and inferer.describe()["n_tiles"] == 3 * 3 * 2
    assert inferer.describe()["precision"] == "float32"


def test_accurate_adds_mirroring_to_parity(image):
    network = tiny_mome()
    expected = NNUNetSlidingWindowInferer((16, 16, 16), 0.5, tta=True, accumulate_dtype="float16")(image, network)
    with torch.inference_mode():
        result = ProfileInferer("accurate", roi_size=(16, 16, 16), sw_batch_size=1)(image, network)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)


def test_fast_keeps_the_parity_tiles_with_float32_accumulation(image):
    network = tiny_mome()
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16), cpu_bf16=False)  # float32 on any CPU
    with torch.inference_mode():
        result = inferer(image, network)
        expected = NNUNetSlidingWindowInferer((16, 16, 16), tile_step=0.5)(image, network)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)
    assert inferer.describe()["n_tiles"] == 3 * 3 * 2


def test_fast_autocasts_to_bfloat16_on_cpus_with_native_bf16(image, monkeypatch):
    monkeypatch.setattr(profiles, "cpu_has_native_bf16", lambda: True)  # emulated where not native: slow, same math
    network = tiny_mome()
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16))
    with torch.inference_mode():
        result = inferer(image, network)
        expected = NNUNetSlidingWindowInferer((16, 16, 16), tile_step=0.5)(image, network)
    assert inferer.describe()["precision"] == "bfloat16" and result.dtype == torch.float32
    assert not torch.equal(result, expected)  # bfloat16 really ran
    error = (result - expected).abs().mean() / expected.abs().mean()
    agreement = (result.argmax(1) == expected.argmax(1)).float().mean()
    assert error < 0.02 and agreement >= 0.99, (error, agreement)  # bfloat16 keeps ~3 significant digits


def test_tile_step_override_places_fewer_tiles(image):
    network = tiny_mome()
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16), tile_step=0.75, cpu_bf16=False)
    with torch.inference_mode():
        result = inferer(image, network)
        expected = NNUNetSlidingWindowInferer((16, 16, 16), tile_step=0.75)(image, network)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)
    assert inferer.describe()["n_tiles"] == 2 * 3 * 2


@pytest.mark.parametrize(
    "scale, image_size, expected",
    [
        (1.0, (160, 196, 160), (128, 128, 128)),
        (1.3, (160, 196, 160), (160, 192, 160)),  # 166.4 -> 192 on y (divisor 32), capped at the image on x, z
        (float("inf"), (160, 196, 160), (160, 224, 160)),  # one whole-volume tile, padded to the divisor
        (1.5, (80, 98, 80), (72, 72, 72)),
        (float("inf"), (40, 30, 50), (128, 128, 128)),  # never smaller than the patch
    ],
)
def test_tile_size_scales_the_patch_and_caps_at_the_image(scale, image_size, expected):
    divisor = (32, 32, 32) if image_size[0] == 160 or image_size[0] == 40 else (8, 8, 8)
    patch = (128,) * 3 if divisor[0] == 32 else (48,) * 3
    assert ProfileInferer("fast", roi_size=patch, tile_scale=scale).tile_size(image_size, divisor) == expected


def test_whole_volume_tile_is_one_network_call(image):
    network = tiny_mome()
    calls = []

    def counting(x):
        calls.append(tuple(x.shape[-3:]))
        return network(x)

    counting.size_divisor = network.size_divisor  # (4, 4, 4)
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16), tile_scale=float("inf"), cpu_bf16=False)
    with torch.inference_mode():
        result = inferer(image, counting)
        expected = NNUNetSlidingWindowInferer((28, 32, 24))(image, network)
    assert calls == [(28, 32, 24)]  # 26 x 30 x 22 zero-padded to the divisor, as nnU-Net pads small images
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)
    assert inferer.describe()["n_tiles"] == 1 and inferer.describe()["tile_scale"] == "whole volume"


def test_enlarged_tiles_fall_back_to_patch_tiles_over_the_memory_budget(image, monkeypatch):
    network = tiny_mome()
    monkeypatch.setattr(profiles, "available_memory_bytes", lambda device: 1000)
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16), tile_scale=2.0, cpu_bf16=False)
    with torch.inference_mode():
        result = inferer(image, network)
        expected = NNUNetSlidingWindowInferer((16, 16, 16), tile_step=0.5)(image, network)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)
    described = inferer.describe()
    assert described["tile_size"] == [16, 16, 16] and "memory budget" in described["fallback"]


def test_out_of_memory_falls_back_to_patch_tiles_then_to_cpu_accumulation(image, monkeypatch):
    """GPU OOM handling, simulated on the CPU (``recoverable`` is what decides that an error is a GPU OOM)."""
    network = tiny_mome()
    monkeypatch.setattr(profiles, "recoverable", lambda error, device: isinstance(error, torch.OutOfMemoryError))
    failures = {"large": 1, "patch": 1}

    def flaky(x):
        kind = "large" if x.shape[-1] > 16 else "patch"
        if failures[kind]:
            failures[kind] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return network(x)

    flaky.size_divisor = network.size_divisor
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16), tile_scale=2.0, cpu_bf16=False)
    with torch.inference_mode():
        result = inferer(image, flaky)
        expected = NNUNetSlidingWindowInferer((16, 16, 16), tile_step=0.5)(image, network)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)  # tiles may be paired (see auto_batch_size)
    described = inferer.describe()
    assert "ran out of GPU memory" in described["fallback"] and described["accumulation"].startswith("cpu")
    assert failures == {"large": 0, "patch": 0}


def test_other_errors_are_not_swallowed(image):
    def broken(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ProfileInferer("fast", roi_size=(16, 16, 16))(image, broken)


def test_precision_per_device_and_profile(monkeypatch):
    monkeypatch.setattr(profiles, "cpu_has_native_bf16", lambda: False)
    assert ProfileInferer("fast").precision(torch.device("cpu")) == "float32"
    assert ProfileInferer("fast").precision(torch.device("cuda")) == "float16"
    assert ProfileInferer("parity").precision(torch.device("cuda")) == "float16"  # nnU-Net autocasts on CUDA
    assert ProfileInferer("fast", cpu_bf16=True).precision(torch.device("cpu")) == "float32"  # no native bf16
    assert ProfileInferer("fast").precision(torch.device("cpu")) == "float32"  # never emulated
    monkeypatch.setattr(profiles, "cpu_has_native_bf16", lambda: True)
    assert ProfileInferer("fast").precision(torch.device("cpu")) == "bfloat16"  # the default where native
    assert ProfileInferer("fast", cpu_bf16=False).precision(torch.device("cpu")) == "float32"  # bundle override
    assert ProfileInferer("parity").precision(torch.device("cpu")) == "float32"
    assert ProfileInferer("accurate").precision(torch.device("cpu")) == "float32"
    assert ProfileInferer("fast").precision(torch.device("cuda")) == "float16"


def test_cpu_bf16_detection_reads_the_flags(tmp_path):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    without = tmp_path / "b"
    without.write_text("processor : 0\nflags : fpu avx2\n")
    assert cpu_has_native_bf16(str(with_bf16)) is True
    assert cpu_has_native_bf16(str(without)) is False
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_bad_profile_names_are_rejected():
    with pytest.raises(ValueError, match="unknown inference profile 'quick'"):
        ProfileInferer("quick")


def test_memory_estimate_halves_in_half_precision():
    assert tile_bytes((8, 8, 8), 32) == 2 * tile_bytes((8, 8, 8), 32, element_size=2)


def test_eval_forward_uses_the_lean_gate_only_for_large_gate_inputs(monkeypatch):
    import scripts.networks as networks

    network = tiny_mome()
    calls = []
    monkeypatch.setattr(network, "forward_lean", lambda x: calls.append(x.shape) or torch.zeros(1))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        network(x)  # 13-channel gate input of 16^3 voxels: far below the threshold
        assert calls == []
        monkeypatch.setattr(networks, "LEAN_GATE_MIN_BYTES", 1)
        network(x)
    assert calls == [x.shape]


def test_small_tiles_are_paired_and_large_ones_are_not(image):
    from scripts.profiles import auto_batch_size

    demo, release = tiny_mome(), type("Gate", (), {"in_channels": 161})()
    assert auto_batch_size((48, 48, 48), demo) == 2
    assert auto_batch_size((128, 128, 128), type("Net", (), {"gate": release})()) == 1
    inferer = ProfileInferer("fast", roi_size=(16, 16, 16))
    with torch.inference_mode():
        paired = inferer(image, demo)
        single = ProfileInferer("fast", roi_size=(16, 16, 16), sw_batch_size=1)(image, demo)
    assert inferer.describe()["tiles_per_call"] == 2
    torch.testing.assert_close(paired, single, rtol=1e-4, atol=1e-4)
