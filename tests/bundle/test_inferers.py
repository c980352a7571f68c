"""nnU-Net-compatible sliding window: tile placement, Gaussian, stitching, padding, mirroring."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from scripts.inferers import NNUNetSlidingWindowInferer, gaussian_importance_map, mirror_tta, tile_starts


@pytest.mark.parametrize(
    "size, patch, step, expected",
    [
        (160, 128, 0.5, [0, 32]),
        (196, 128, 0.5, [0, 34, 68]),
        (128, 128, 0.5, [0]),
        (110, 64, 0.5, [0, 23, 46]),
        (52, 32, 0.5, [0, 10, 20]),
        (100, 32, 1.0, [0, 23, 45, 68]),
    ],
)
def test_tile_starts_follow_nnunet(size, patch, step, expected):
    assert tile_starts(size, patch, step) == expected


def test_mome_space_volume_takes_twelve_release_tiles():
    inferer = NNUNetSlidingWindowInferer((128, 128, 128))
    assert len(inferer.tiles((160, 196, 160))) == 12


def test_tile_starts_rejects_bad_input():
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts(20, 32, 0.5)
    with pytest.raises(ValueError, match="tile step"):
        tile_starts(64, 32, 0.0)


def test_gaussian_importance_map_properties():
    weights = gaussian_importance_map((32, 24, 16))
    assert weights.dtype == torch.float16 and weights.shape == (32, 24, 16)
    assert weights[16, 12, 8] == weights.max() == 1000
    assert (weights > 0).all()
    torch.testing.assert_close(weights[16 - 5, 12, 8], weights[16 + 5, 12, 8])
    # the far tails underflow in float16 before rescaling, exactly as nnU-Net: they share the floor value
    assert (weights == weights.min()).sum() > 100


class Scale(torch.nn.Module):
    """A position-dependent network: 2 channels = (x, 2x + voxel index along the first axis)."""

    def forward(self, x):
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return torch.cat([x, 2 * x + ramp], 1)


@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_identity_like_network_is_stitched_exactly(sw_batch_size, dtype):
    inferer = NNUNetSlidingWindowInferer((8, 8, 8), tile_step=0.5, sw_batch_size=sw_batch_size, accumulate_dtype=dtype)
    x = torch.rand(2, 1, 13, 9, 20, generator=torch.Generator().manual_seed(0))
    out = inferer(x, lambda t: torch.cat([t, 2 * t], 1))
    assert out.shape == (2, 2, 13, 9, 20) and out.dtype == torch.float32
    # float16 accumulation: up to 8 overlapping tiles, each rounded to 2**-11 relative, so ~8 * 2**-11 < 1e-2;
    # a misplaced tile would be off by O(1)
    tol = 1e-6 if dtype == "float32" else 1e-2
    torch.testing.assert_close(out, torch.cat([x, 2 * x], 1), atol=tol, rtol=tol)


def test_small_images_are_padded_and_cropped_back():
    inferer = NNUNetSlidingWindowInferer((8, 8, 8))
    x = torch.rand(1, 1, 5, 8, 3)
    seen = []

    def network(t):
        seen.append(t.shape)
        return t

    out = inferer(x, network)
    assert seen == [(1, 1, 8, 8, 8)]
    torch.testing.assert_close(out, x)


def test_position_dependent_outputs_are_gaussian_weighted():
    """Overlapping tiles disagree here, so the result must be the Gaussian-weighted mean of the tile outputs."""
    inferer = NNUNetSlidingWindowInferer((8, 8, 8), tile_step=0.5)
    x = torch.zeros(1, 1, 12, 8, 8)
    out = inferer(x, Scale())[0, 1]
    weights = gaussian_importance_map((8, 8, 8)).float()
    # voxel 6 along axis 0 is covered by tiles starting at 0 (local 6) and 4 (local 2)
    w0, w1 = weights[6, 4, 4], weights[2, 4, 4]
    torch.testing.assert_close(out[6, 4, 4], (w0 * 6 + w1 * 2) / (w0 + w1))


def test_mirror_tta_averages_all_flip_combinations():
    x = torch.rand(1, 1, 4, 5, 6)
    out = mirror_tta(Scale(), x, (0, 1, 2))
    ramp = torch.arange(4, dtype=x.dtype).view(1, 1, -1, 1, 1)
    # flipping axis 0 reverses the ramp in half of the 8 passes: the mean ramp is (L - 1) / 2
    torch.testing.assert_close(out, torch.cat([x, 2 * x + 0 * ramp + 1.5], 1))


def test_metatensor_meta_is_kept():
    x = MetaTensor(torch.rand(1, 1, 8, 8, 8), meta={"filename_or_obj": "case.nii.gz"})
    out = NNUNetSlidingWindowInferer((8, 8, 8))(x, lambda t: t)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case.nii.gz"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"roi_size": (8, 8)}, "roi_size"),
        ({"tile_step": 1.5}, "tile_step"),
        ({"accumulate_dtype": "bf16"}, "accumulate"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"mirror_axes": (3,)}, "mirror_axes"),
    ],
)
def test_bad_inferer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NNUNetSlidingWindowInferer(**{"roi_size": (8, 8, 8), **kwargs})
