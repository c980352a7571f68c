"""MONAI transforms specific to MoME."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["ReverseSpatialAxes", "ReverseSpatialAxesd"]


class ReverseSpatialAxes(Transform):
    """Reverses the spatial axis order of a channel-first 3-D array: ``(C, x, y, z) <-> (C, z, y, x)``.

    nnU-Net reads NIfTI through SimpleITK, whose arrays are ``(z, y, x)``, so the authors' networks were trained
    on that axis order, while MONAI's readers yield ``(x, y, z)``. Applying this before the network and once more
    on its output keeps released weights exact. Only the array is permuted: metadata (the affine) keeps
    describing the original layout, so the transform must be applied an even number of times before saving.
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first 3-D array (C, X, Y, Z), got shape {tuple(img.shape)}.")
        return img.permute(0, 3, 2, 1).contiguous()


class ReverseSpatialAxesd(MapTransform):
    """Dictionary wrapper of :class:`ReverseSpatialAxes`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reverse = ReverseSpatialAxes()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.reverse(d[key])
        return d
