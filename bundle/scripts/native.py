"""Native scan <-> MoME space: forward resampling through the registration, inverse mapping of class probabilities.

Forward (:func:`to_mome_space`): the native image is sampled (trilinear, anti-aliased when the scan is finer than the
model grid) on the MoME grid at the model's spacing through the registration, then multiplied by MoME's brain mask.
One interpolation, no intermediate 1 mm template image. The z-score follows in the bundle's preprocessing.

Inverse (:func:`probabilities_to_native`): the network's class probabilities (not labels) are interpolated back onto
the native grid and the argmax is taken there, so lesion borders are as smooth as the native grid allows. Only the
native bounding box of the region where a foreground class can win is sampled, in slabs, so memory stays bounded
for any scan size. Background probability outside the MoME field of view is 1. The output has the input's exact
shape; its affine is the input's affine.

Both steps also exist as MONAI dictionary transforms (:class:`NativeToMoMEd`, :class:`MoMEToNatived`) so that the
bundle's ``configs/inference_native.json`` runs native-space NIfTI directly.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Hashable, Mapping
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, MapTransform

from .intensity import normalise_intensity
from .registration import RegistrationSettings, register_to_template, validate_volume
from .template import mome_brain_mask, sample_at_voxels, template_grid, voxel_to_world

__all__ = [
    "MoMEToNatived",
    "NativeToMoMEd",
    "antialias",
    "foreground_box",
    "probabilities_to_native",
    "to_mome_space",
]

SLAB_VOXELS = 2**22  # native voxels sampled at once by the inverse mapping (about 100 MB for 4 classes)


def _as_numpy(affine: Any) -> np.ndarray:
    return np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)


def _transform_points(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    return points @ torch.from_numpy(matrix[:3, :3].T).float() + torch.from_numpy(matrix[:3, 3]).float()


def antialias(image: torch.Tensor, affine: np.ndarray, spacing: float) -> torch.Tensor:
    """Gaussian pre-filter of an (X, Y, Z) image along axes finer than ``spacing`` (sigma = (ratio - 1) / 2 voxels)."""
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    sigmas = [max(0.0, (spacing / v - 1.0) / 2.0) for v in voxel]
    if max(sigmas) < 0.25:
        return image
    return GaussianSmooth(sigma=sigmas)(image[None].float())[0]


def to_mome_space(
    image: torch.Tensor | np.ndarray, affine: np.ndarray, native_to_template: np.ndarray, spacing: float
) -> Tuple[torch.Tensor, np.ndarray]:
    """Resamples a native (X, Y, Z) image into brain-masked MoME space at ``spacing`` mm; returns (image, affine)."""
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    affine = _as_numpy(affine)
    shape, mome_affine = template_grid(spacing)
    mome_to_native_voxel = np.linalg.inv(affine) @ np.linalg.inv(native_to_template) @ mome_affine
    coords = voxel_to_world(shape, mome_to_native_voxel)
    sampled = sample_at_voxels(antialias(image, affine, spacing)[None], coords)[0]
    return sampled * mome_brain_mask(spacing), mome_affine


def foreground_box(probabilities: torch.Tensor, margin: int = 1) -> Tuple[np.ndarray, np.ndarray] | None:
    """Voxel bounds (low, high inclusive) of where background is not certain to win the argmax, or ``None``.

    Interpolated probabilities are convex combinations of neighbours, so background (probability >= 0.5 there) wins
    everywhere outside the box of voxels with background < 0.5 grown by one voxel.
    """
    candidates = probabilities[0] < 0.5
    if not bool(candidates.any()):
        return None
    index = torch.nonzero(candidates)
    upper = np.array(probabilities.shape[1:]) - 1
    low = np.maximum(index.min(0).values.numpy() - margin, 0)
    high = np.minimum(index.max(0).values.numpy() + margin, upper)
    return low, high


def _native_box(
    box: Tuple[np.ndarray, np.ndarray], native_from_mome: np.ndarray, native_shape: Sequence[int]
) -> Tuple[np.ndarray, np.ndarray] | None:
    """Native voxel bounds covering a MoME voxel box (its eight corners mapped, rounded outwards, clipped)."""
    low, high = box
    bounds = (low, high)
    corners = np.array([[bounds[b][a] for a, b in enumerate(bits)] for bits in itertools.product((0, 1), repeat=3)])
    mapped = corners @ native_from_mome[:3, :3].T + native_from_mome[:3, 3]
    lo = np.maximum(np.floor(mapped.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(mapped.max(0)).astype(int) + 1, np.array(native_shape) - 1)
    return (lo, hi) if (hi >= lo).all() else None


def probabilities_to_native(
    probabilities: torch.Tensor,
    spacing: float,
    native_shape: Sequence[int],
    native_affine: np.ndarray,
    native_to_template: np.ndarray,
    slab_voxels: int = SLAB_VOXELS,
) -> np.ndarray:
    """Class probabilities (C, X', Y', Z') on the MoME grid -> uint8 label map on the native grid (argmax there)."""
    probabilities = torch.as_tensor(probabilities).float()
    labels = np.zeros(tuple(int(n) for n in native_shape), dtype=np.uint8)
    box = foreground_box(probabilities)
    if box is None:
        return labels
    _, mome_affine = template_grid(spacing)
    native_affine = _as_numpy(native_affine)
    mome_from_native = np.linalg.inv(mome_affine) @ native_to_template @ native_affine
    native_box = _native_box(box, np.linalg.inv(mome_from_native), native_shape)
    if native_box is None:
        return labels
    (x0, y0, z0), (x1, y1, z1) = native_box
    foreground = probabilities[1:]
    plane = (y1 - y0 + 1) * (z1 - z0 + 1)
    step = max(1, slab_voxels // plane)
    for start in range(x0, x1 + 1, step):
        stop = min(start + step - 1, x1)
        offset = np.eye(4)
        offset[:3, 3] = [start, y0, z0]
        coords = voxel_to_world((stop - start + 1, y1 - y0 + 1, z1 - z0 + 1), mome_from_native @ offset)
        sampled = sample_at_voxels(foreground, coords)
        background = 1.0 - sampled.sum(0, keepdim=True)
        slab = torch.cat([background, sampled]).argmax(0).to(torch.uint8).numpy()
        labels[start : stop + 1, y0 : y1 + 1, z0 : z1 + 1] = slab
    return labels


def _record(value: Any) -> Dict[str, Any] | None:
    """A registration record from a dict or its JSON string (``None`` stays ``None``)."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1:  # a collated batch of one
        return _record(value[0])
    return json.loads(value)


class NativeToMoMEd(MapTransform):
    """Registers a native image to the template and resamples it into brain-masked MoME space.

    Input: ``d[key]`` a channel-first (1, X, Y, Z) MetaTensor with its RAS affine (``LoadImaged`` +
    ``EnsureChannelFirstd``); optionally ``d[modality_key]`` (picks the registration template's contrast). Output: the
    MoME-space image (1, X', Y', Z') with the MoME affine, and ``d[registration_key]``: a JSON string (it survives
    MONAI's collation) with the registration summary plus ``native_affine``, ``native_shape`` and ``spacing``, which
    :class:`MoMEToNatived` needs. A precomputed record with ``native_to_template`` is reused.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing: float | Sequence[float],
        registration_key: str = "registration",
        modality_key: str = "modality",
        settings: RegistrationSettings | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        spacings = [float(s) for s in (spacing if isinstance(spacing, Sequence) else [spacing] * 3)]
        if max(spacings) - min(spacings) > 1e-6:
            raise ValueError(f"MoME space needs an isotropic model spacing, got {spacings}.")
        self.spacing = spacings[0]
        self.registration_key = registration_key
        self.settings = settings

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            affine = _as_numpy(image.affine)
            name = str(image.meta.get("filename_or_obj", key)) if isinstance(image, MetaTensor) else str(key)
            array = image[0].detach().cpu().numpy()
            validate_volume(array, affine, name)
            array = normalise_intensity(array)
            record = _record(d.get(self.registration_key)) or {}
            if "native_to_template" not in record:
                modality = d.get(self.modality_key)
                record.update(register_to_template(array, affine, self.settings, modality, name).to_dict())
            native_to_template = np.asarray(record["native_to_template"], dtype=float)
            mome, mome_affine = to_mome_space(array, affine, native_to_template, self.spacing)
            record.update(native_affine=affine.tolist(), native_shape=list(array.shape), spacing=self.spacing)
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            meta.update(affine=torch.from_numpy(mome_affine), spatial_shape=np.array(mome.shape))
            d[key] = MetaTensor(mome[None], affine=torch.from_numpy(mome_affine), meta=meta)
            d[self.registration_key] = json.dumps(record)
        return d


class MoMEToNatived(MapTransform):
    """Maps class probabilities (C, X', Y', Z') in MoME space to a (1, X, Y, Z) uint8 label map on the native grid.

    Reads the geometry that :class:`NativeToMoMEd` stored in ``d[registration_key]`` (or in the probabilities'
    metadata under that key, which is where MONAI's evaluators keep extra input fields).
    """

    def __init__(
        self, keys: KeysCollection, registration_key: str = "registration", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.registration_key = registration_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        record = _record(d.get(self.registration_key))
        for key in self.key_iterator(d):
            probabilities = d[key]
            if record is None and isinstance(probabilities, MetaTensor):
                record = _record(probabilities.meta.get(self.registration_key))
            if record is None:
                raise KeyError(f"no '{self.registration_key}' record: run NativeToMoMEd in the preprocessing first.")
            affine = np.asarray(record["native_affine"], dtype=float)
            labels = probabilities_to_native(
                torch.as_tensor(probabilities).detach().cpu(),
                float(record["spacing"]),
                record["native_shape"],
                affine,
                np.asarray(record["native_to_template"], dtype=float),
            )
            meta = dict(probabilities.meta) if isinstance(probabilities, MetaTensor) else {}
            meta.update(affine=torch.from_numpy(affine), spatial_shape=np.array(labels.shape))
            meta["original_affine"] = torch.from_numpy(affine)
            d[key] = MetaTensor(torch.from_numpy(labels)[None], affine=torch.from_numpy(affine), meta=meta)
        return d
