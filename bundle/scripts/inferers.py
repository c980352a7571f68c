"""nnU-Net-compatible sliding-window inference as a MONAI :class:`~monai.inferers.Inferer`.

Reproduces what the MoME authors' predictor (nnU-Net v2.2) does per image, so that released weights give the
published numbers:

* the image is zero-padded (symmetrically) up to the patch size where it is smaller;
* tiles are placed with nnU-Net's rule: ``n = ceil((L - P) / (step * P)) + 1`` per axis, starts spread evenly
  from 0 to ``L - P`` and rounded;
* every tile's logits are weighted by a Gaussian importance map (a centred delta blurred with sigma = P / 8,
  truncated at 4 sigma, cast to float16, scaled to a maximum of 1000, zeros replaced by the smallest non-zero
  value) and the weighted sum is divided by the summed weights;
* optional test-time augmentation averages the logits over all ``2^len(axes)`` mirror combinations.

nnU-Net accumulates in float16 on CPU; ``accumulate_dtype="float16"`` reproduces that exactly, the default
float32 avoids its rounding error (at most ~0.04 logit on the reference fixture).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

__all__ = ["NNUNetSlidingWindowInferer", "gaussian_importance_map", "mirror_tta", "tile_starts"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def tile_starts(image_size: int, patch_size: int, step: float) -> list[int]:
    """nnU-Net tile start positions along one axis (``image_size >= patch_size``)."""
    if image_size < patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch size {patch_size}; pad first.")
    if not 0 < step <= 1:
        raise ValueError(f"tile step must be in (0, 1], got {step}.")
    n_tiles = math.ceil((image_size - patch_size) / (step * patch_size)) + 1
    if n_tiles == 1:
        return [0]
    spacing = (image_size - patch_size) / (n_tiles - 1)
    return [int(round(spacing * i)) for i in range(n_tiles)]


def _gaussian_1d(length: int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """A normalised, truncated Gaussian kernel sampled at the offsets of a ``length`` patch from its centre."""
    centre = length // 2
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(length, dtype=torch.float64) - centre
    support = torch.arange(-radius, radius + 1, dtype=torch.float64)
    norm = torch.exp(-0.5 * (support / sigma) ** 2).sum()
    values = torch.exp(-0.5 * (offsets / sigma) ** 2) / norm
    return torch.where(offsets.abs() <= radius, values, torch.zeros_like(values))


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125, max_value: float = 1000.0):
    """nnU-Net's tile weighting, reproduced operation by operation.

    A centred unit impulse blurred with a Gaussian of sigma ``patch * sigma_scale`` (normalised 1-D kernels,
    truncated at 4 sigma) is cast to float16 *before* it is rescaled to ``max_value`` (as nnU-Net v2.2 does), so
    its far tails underflow; zeros are then replaced by the smallest non-zero weight. The tails therefore weigh
    overlapping tiles (almost) equally, which matters for parity near tile borders.
    """
    kernels = [_gaussian_1d(int(p), float(p) * sigma_scale) for p in patch_size]
    weights = (kernels[0][:, None, None] * kernels[1][None, :, None] * kernels[2][None, None, :]).to(torch.float16)
    weights = weights / weights.max() * max_value
    weights[weights == 0] = weights[weights != 0].min()
    return weights


def mirror_tta(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Mean of ``network`` over the identity and every combination of flips of the given spatial axes."""
    dims = [int(a) + 2 for a in axes]
    prediction = network(x)
    combinations = [c for n in range(1, len(dims) + 1) for c in itertools.combinations(dims, n)]
    for flip_dims in combinations:
        prediction = prediction + torch.flip(network(torch.flip(x, flip_dims)), flip_dims)
    return prediction / (len(combinations) + 1)


class NNUNetSlidingWindowInferer(Inferer):
    """Sliding-window inference with nnU-Net's tile placement, Gaussian weighting and mirroring.

    Args:
        roi_size: patch size (3 ints), e.g. the plans' ``patch_size``.
        tile_step: tile step as a fraction of the patch size (nnU-Net default 0.5).
        tta: average over mirror flips of ``mirror_axes`` (nnU-Net's "mirroring", 8 passes for 3 axes).
        mirror_axes: spatial axes (0-based) mirrored when ``tta`` is on.
        use_gaussian: Gaussian tile weighting (True) or a uniform average.
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        accumulate_dtype: ``"float32"`` (default) or ``"float16"`` (bit-level parity with nnU-Net on CPU).
        sw_batch_size: tiles per network call.
        progress: show a progress bar over tiles (needs tqdm).

    Call:
        ``inferer(inputs, network)`` with ``inputs`` of shape ``(B, C, D, H, W)`` returns float32 logits
        ``(B, C_out, D, H, W)`` on the input's device.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        tile_step: float = 0.5,
        tta: bool = False,
        mirror_axes: Sequence[int] = (0, 1, 2),
        use_gaussian: bool = True,
        sigma_scale: float = 0.125,
        accumulate_dtype: str = "float32",
        sw_batch_size: int = 1,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive ints, got {roi_size!r}.")
        if not 0 < tile_step <= 1:
            raise ValueError(f"tile_step must be in (0, 1], got {tile_step}.")
        if accumulate_dtype not in _DTYPES:
            raise ValueError(f"accumulate_dtype must be one of {sorted(_DTYPES)}, got {accumulate_dtype!r}.")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        if any(int(a) not in (0, 1, 2) for a in mirror_axes):
            raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2, got {list(mirror_axes)}.")
        self.tile_step = float(tile_step)
        self.tta = bool(tta)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.use_gaussian = use_gaussian
        self.sigma_scale = sigma_scale
        self.accumulate_dtype = _DTYPES[accumulate_dtype]
        self.sw_batch_size = sw_batch_size
        self.progress = progress

    def tiles(self, spatial_size: Sequence[int]) -> list[tuple[slice, slice, slice]]:
        """Tile slices for an image of ``spatial_size`` (already padded to at least the patch size)."""
        starts = [tile_starts(int(s), p, self.tile_step) for s, p in zip(spatial_size, self.roi_size)]
        return [
            tuple(slice(start, start + p) for start, p in zip(corner, self.roi_size))  # type: ignore[misc]
            for corner in itertools.product(*starts)
        ]

    def _pad(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """Zero-pads spatial axes up to the patch size (nnU-Net: half below, rest above)."""
        shape = image.shape[-3:]
        missing = [max(p - s, 0) for s, p in zip(shape, self.roi_size)]
        if not any(missing):
            return image, (slice(None),) * 3
        pad: list[int] = []
        for m in reversed(missing):
            pad += [m // 2, m - m // 2]
        crop = tuple(slice(m // 2, m // 2 + s) for m, s in zip(missing, shape))
        return F.pad(image, pad, mode="constant", value=0.0), crop

    def _predict_tiles(self, network: Callable[..., torch.Tensor], batch: torch.Tensor, **kwargs: Any):
        call = (lambda x: network(x, **kwargs)) if kwargs else network
        if self.tta:
            return mirror_tta(call, batch, self.mirror_axes)
        return call(batch)

    def _infer_one(self, image: torch.Tensor, network: Callable[..., torch.Tensor], **kwargs: Any) -> torch.Tensor:
        padded, crop = self._pad(image)
        tiles = self.tiles(padded.shape[-3:])
        weight = gaussian_importance_map(self.roi_size, self.sigma_scale).to(padded.device)
        if not self.use_gaussian:
            weight = torch.ones_like(weight)
        if self.accumulate_dtype != torch.float16:
            weight = weight.to(self.accumulate_dtype)
        logits: torch.Tensor | None = None
        counts = torch.zeros(padded.shape[-3:], dtype=self.accumulate_dtype, device=padded.device)
        for first in self._tile_batches(len(tiles)):
            group = tiles[first : first + self.sw_batch_size]
            batch = torch.stack([padded[(slice(None), *tile)] for tile in group])
            predictions = self._predict_tiles(network, batch, **kwargs)
            if logits is None:
                logits = torch.zeros(
                    (predictions.shape[1], *padded.shape[-3:]), dtype=self.accumulate_dtype, device=padded.device
                )
            for tile, prediction in zip(group, predictions):
                logits[(slice(None), *tile)] += prediction.to(padded.device) * weight
                counts[tile] += weight
        assert logits is not None  # at least one tile always exists
        logits /= counts
        return logits[(slice(None), *crop)].float()

    def _tile_batches(self, n_tiles: int):
        starts = range(0, n_tiles, self.sw_batch_size)
        if not self.progress:
            return starts
        try:
            from tqdm import tqdm
        except ImportError:
            return starts
        return tqdm(starts, desc="tiles", unit="batch")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """Runs the sliding window over every image of the batch ``inputs`` ``(B, C, D, H, W)``."""
        if inputs.ndim != 5:
            raise ValueError(f"expected inputs of shape (B, C, D, H, W), got {tuple(inputs.shape)}.")
        images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        outputs = torch.stack(
            [self._infer_one(image, network, **_kwargs_of_image(kwargs, index, len(images))) for index, image in
             enumerate(images)]
        )  # fmt: skip
        if isinstance(inputs, MetaTensor):
            return convert_to_dst_type(outputs, inputs, dtype=outputs.dtype)[0]
        return outputs


def _kwargs_of_image(kwargs: dict[str, Any], index: int, batch: int) -> dict[str, Any]:
    """Per-image network arguments: a tensor with one row per image of the batch (e.g. MoME+'s availability
    vector) is sliced to that image's row; anything else is passed unchanged."""
    return {
        key: value[index : index + 1]
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch
        else value
        for key, value in kwargs.items()
    }
