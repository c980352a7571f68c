"""The fused inference instance norm + LeakyReLU equals ``nn.InstanceNorm3d(affine) -> LeakyReLU`` (issue 37)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.fused_norm import instance_norm_leaky_relu_


def _reference_block(channels: int) -> nn.Sequential:
    torch.manual_seed(3)
    norm = nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    return nn.Sequential(norm, nn.LeakyReLU(0.01)).eval()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("offset", [0.0, 50.0])  # conv outputs far from zero mean: no cancellation trouble
def test_float32_equals_the_nn_modules_in_place_and_in_layout(layout, offset):
    block = _reference_block(8)
    x = (torch.randn(2, 8, 20, 36, 30) * 3 + offset).contiguous(memory_format=layout)
    with torch.inference_mode():
        expected = block(x.clone())
        pointer = x.data_ptr()
        out = instance_norm_leaky_relu_(x, block[0].weight, block[0].bias)
    assert out.data_ptr() == pointer and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def test_bfloat16_is_as_close_to_float32_as_the_nn_modules_are():
    block = _reference_block(16)
    x = (torch.randn(1, 16, 40, 40, 40) * 2 + 1).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        exact = block(x.float())  # the same bf16 input, normalised in float32
        nn_error = (block.bfloat16()(x.clone()).float() - exact).abs().max()
        fused = instance_norm_leaky_relu_(x.clone(), block[0].weight.bfloat16(), block[0].bias.bfloat16()).float()
    assert (fused - exact).abs().max() <= nn_error * 1.1
    assert (fused - exact).abs().mean() < 0.01
