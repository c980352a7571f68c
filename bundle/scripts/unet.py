"""The nnU-Net-compatible plain 3-D U-Net that MoME's experts and gate are made of.

References:
    Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
    Nature Methods 2021, https://doi.org/10.1038/s41592-020-01008-z (the topology reproduced here).
    Zhang et al., "A Foundation Model for Brain Lesion Segmentation with Mixture of Modality Experts",
    MICCAI 2024, https://arxiv.org/abs/2405.10246 (the experts and gate built from it, see ``scripts.networks``).

The U-Net reproduces nnU-Net's ``PlainConvUNet`` numerically (conv with bias -> InstanceNorm(affine, eps 1e-5) ->
LeakyReLU(0.01), transposed-conv upsampling, concatenation ``[upsampled, skip]``, one 1x1x1 head per decoder level),
so the authors' checkpoints load after a pure key rename (see ``scripts.upstream``).

Axis convention: like nnU-Net with its SimpleITK reader, the networks expect arrays in ``(z, y, x)`` voxel order of
the NIfTI grid; the bundle's transforms take care of that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["ConvNormAct", "KernelLike", "PlainConvUNet", "he_init"]

KernelLike = int | Sequence[int]


def _as_triple(value: KernelLike, what: str) -> Tuple[int, int, int]:
    """Expands an int or a length-3 sequence into a tuple of three positive ints."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(triple) != 3 or any(v < 1 for v in triple):
        raise ValueError(f"{what} must be a positive int or 3 positive ints, got {value!r}.")
    return triple  # type: ignore[return-value]


def he_init(module: nn.Module, neg_slope: float = 0.01) -> None:
    """nnU-Net's weight initialisation: Kaiming normal for (transposed) convolutions, zero biases.

    Args:
        module: any module; only ``Conv3d`` and ``ConvTranspose3d`` are changed (use with ``Module.apply``).
        neg_slope: negative slope of the LeakyReLU that follows, for the Kaiming gain.
    """
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNormAct(nn.Module):
    """``Conv3d(bias) -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01)``, nnU-Net's basic block.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel; padding is ``(k - 1) // 2`` per axis ("same" for odd kernels).
        stride: convolution stride (the first block of an encoder stage downsamples).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: KernelLike, stride: KernelLike = 1) -> None:
        super().__init__()
        kernel = _as_triple(kernel_size, "kernel_size")
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel,
            stride=_as_triple(stride, "stride"),
            padding=tuple((k - 1) // 2 for k in kernel),
            bias=True,
        )
        self.norm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _conv_stack(in_channels: int, out_channels: int, n_convs: int, kernel: KernelLike, stride: KernelLike) -> nn.Module:
    """``n_convs`` :class:`ConvNormAct` blocks in a ``Sequential``; only the first one strides (and changes width)."""
    blocks = [ConvNormAct(in_channels, out_channels, kernel, stride)]
    blocks += [ConvNormAct(out_channels, out_channels, kernel) for _ in range(n_convs - 1)]
    return nn.Sequential(*blocks)


class PlainConvUNet(nn.Module):
    """nnU-Net ``PlainConvUNet`` (3-D) with exposed encoder skips and per-level logits.

    Args:
        in_channels: input image channels.
        out_channels: logits per voxel (classes, or experts x classes for a MoME gate).
        features_per_stage: channels of each encoder stage, e.g. ``(32, 64, 128, 256, 320, 320)``.
        kernel_sizes: conv kernel of each stage (int or 3 ints per stage).
        strides: stride of the first conv of each stage; the first entry is usually 1.
        n_conv_per_stage: convolutions per encoder stage.
        n_conv_per_stage_decoder: convolutions per decoder stage, from the lowest resolution up
            (``len(features_per_stage) - 1`` entries).
        deep_supervision: in training mode, return logits of every decoder level (high -> low resolution).
        prior_channels: width of an optional prior vector concatenated (as constant maps) to the bottleneck
            features before the first upsampling; used by MoME+'s gate. 0 disables it.

    Shapes:
        input ``(B, in_channels, D, H, W)`` with each spatial size divisible by the product of the strides;
        output logits ``(B, out_channels, D, H, W)`` (eval), or a list of per-level logits in training mode with
        deep supervision.
    """

    __jit_unused_properties__ = ["size_divisor"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[KernelLike],
        strides: Sequence[KernelLike],
        n_conv_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
        deep_supervision: bool = True,
        prior_channels: int = 0,
    ) -> None:
        super().__init__()
        n_stages = len(features_per_stage)
        _check_unet_args(
            in_channels, out_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage,
            n_conv_per_stage_decoder, prior_channels,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features_per_stage = [int(f) for f in features_per_stage]
        self.strides = [_as_triple(s, "stride") for s in strides]
        self.deep_supervision = deep_supervision
        self.prior_channels = prior_channels

        self.encoder = nn.ModuleList()
        channels = in_channels
        for stage in range(n_stages):
            feats = self.features_per_stage[stage]
            self.encoder.append(
                _conv_stack(channels, feats, n_conv_per_stage[stage], kernel_sizes[stage], strides[stage])
            )
            channels = feats

        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in range(n_stages - 1):
            skip_stage = n_stages - 2 - level
            below = self.features_per_stage[skip_stage + 1] + (prior_channels if level == 0 else 0)
            feats = self.features_per_stage[skip_stage]
            up_factor = self.strides[skip_stage + 1]
            self.upsample.append(nn.ConvTranspose3d(below, feats, up_factor, stride=up_factor, bias=True))
            self.decoder.append(
                _conv_stack(2 * feats, feats, n_conv_per_stage_decoder[level], kernel_sizes[skip_stage], 1)
            )
            self.heads.append(nn.Conv3d(feats, out_channels, 1, bias=True))
        self.apply(he_init)

    @property
    def size_divisor(self) -> Tuple[int, int, int]:
        """Per-axis factor that input spatial sizes must be divisible by."""
        divisor = [1, 1, 1]
        for stride in self.strides:
            divisor = [d * s for d, s in zip(divisor, stride)]
        return divisor[0], divisor[1], divisor[2]

    def forward_features(
        self,
        x: torch.Tensor,
        prior: torch.Tensor | None = None,
        all_levels: bool = False,
        first_block_done: bool = False,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Runs the U-Net and returns ``(skips, logits)``.

        Args:
            x: input ``(B, C_in, D, H, W)``, or with ``first_block_done`` the output of the first conv block.
            prior: ``(B, prior_channels)`` vector for MoME+ gates; required iff ``prior_channels > 0``.
            all_levels: compute the logits of every decoder level (deep supervision) instead of only the
                full-resolution one.
            first_block_done: ``x`` already went through ``encoder[0][0]`` (MoME's memory-lean gate path).

        Returns:
            skips: the output of every encoder stage, full resolution first (``skips[0]`` is the stage-0 feature
            map a MoME gate consumes).
            logits: per-level logits ordered high -> low resolution (a single full-resolution map unless
            ``all_levels``).
        """
        skips: List[torch.Tensor] = []
        for index, stage in enumerate(self.encoder):
            if index == 0 and first_block_done:
                for block_index, block in enumerate(stage):
                    if block_index > 0:
                        x = block(x)
            else:
                x = stage(x)
            skips.append(x)
        x = self._with_prior(skips[-1], prior)
        logits: List[torch.Tensor] = []
        n_levels = len(self.decoder)
        for level, (up, block, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = block(torch.cat([up(x), skips[n_levels - 1 - level]], dim=1))
            if all_levels or level == n_levels - 1:
                logits.append(head(x))
        logits.reverse()
        return skips, logits

    def _with_prior(self, bottleneck: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """``bottleneck`` with the prior vector appended as constant maps (unchanged without prior channels)."""
        if self.prior_channels == 0:
            return bottleneck
        if prior is None:
            raise ValueError(f"this network needs a prior vector of {self.prior_channels} channels.")
        shape = bottleneck.shape
        maps = prior.to(bottleneck.dtype)[:, :, None, None, None].expand(-1, -1, shape[2], shape[3], shape[4])
        return torch.cat([bottleneck, maps], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits; in training mode with deep supervision, the list of per-level logits."""
        if self.training and self.deep_supervision and not torch.jit.is_scripting():
            return self.forward_features(x, None, True)[1]  # type: ignore[return-value]
        return self.forward_features(x, None, False)[1][0]


def _check_unet_args(
    in_channels: int,
    out_channels: int,
    features_per_stage: Sequence[int],
    kernel_sizes: Sequence[KernelLike],
    strides: Sequence[KernelLike],
    n_conv_per_stage: Sequence[int],
    n_conv_per_stage_decoder: Sequence[int],
    prior_channels: int,
) -> None:
    """Checks :class:`PlainConvUNet`'s arguments before any layer is built.

    Raises:
        ValueError: fewer than 2 stages, a non-positive channel count, a per-stage list of the wrong length, a
            kernel or stride that is not a positive int or 3 positive ints, or a stage without convolutions.
    """
    n_stages = len(features_per_stage)
    if n_stages < 2:
        raise ValueError(f"a U-Net needs at least 2 stages, got features_per_stage={list(features_per_stage)}.")
    if in_channels < 1 or out_channels < 1 or prior_channels < 0 or min(features_per_stage) < 1:
        raise ValueError(
            f"channel counts must be positive, got in={in_channels}, out={out_channels}, "
            f"features={list(features_per_stage)}, prior={prior_channels}."
        )
    for name, seq, expected in (
        ("kernel_sizes", kernel_sizes, n_stages),
        ("strides", strides, n_stages),
        ("n_conv_per_stage", n_conv_per_stage, n_stages),
        ("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1),
    ):
        if len(seq) != expected:
            raise ValueError(f"{name} needs {expected} entries for {n_stages} stages, got {len(seq)}.")
    for kernel, stride in zip(kernel_sizes, strides):
        _as_triple(kernel, "kernel_size")
        _as_triple(stride, "stride")
    if min(list(n_conv_per_stage) + list(n_conv_per_stage_decoder)) < 1:
        raise ValueError(
            "every stage needs at least one convolution, got "
            f"n_conv_per_stage={list(n_conv_per_stage)}, n_conv_per_stage_decoder={list(n_conv_per_stage_decoder)}."
        )
