"""MoME space: the MNI152 2009a template grid, its crop, and world <-> voxel sampling helpers.

MoME's networks see images affinely registered to the MNI152 2009a 1 mm template (197x233x189 voxels, origin
(-98, -134, -72) RAS), multiplied by MoME's brain mask and cropped to ``[20:180, 20:216, 0:160]``
(mome-method.md section 3.2). Models trained at another voxel size (the synthetic demo: 2 mm) use the same field of
view resampled to that spacing. Affines here are 4x4 voxel -> RAS millimetre matrices (nibabel / MONAI convention).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CROP",
    "RESOURCES",
    "TEMPLATE_ORIGIN",
    "TEMPLATE_SHAPE",
    "TISSUE_SIGNAL",
    "mome_brain_mask",
    "sample_at_voxels",
    "template_grid",
    "template_maps",
    "template_volume",
    "voxel_to_world",
]

RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "mni152_2009a"
TEMPLATE_SHAPE = (197, 233, 189)
TEMPLATE_ORIGIN = np.array([-98.0, -134.0, -72.0])
# MoME space: the 1 mm template cropped to [20:180, 20:216, 0:160] (mome-method.md section 3.2).
CROP = ((20, 180), (20, 216), (0, 160))
# Relative signal of CSF, grey and white matter per contrast (1.5-3 T clinical sequences, roughly).
TISSUE_SIGNAL: Dict[str, Tuple[float, float, float]] = {
    "t1": (0.22, 0.55, 0.80),
    "t1ce": (0.24, 0.56, 0.78),
    "t2": (1.00, 0.62, 0.45),
    "flair": (0.10, 0.62, 0.48),
    "dwi": (0.14, 0.60, 0.50),
}


def template_grid(spacing: float) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """Shape and affine of MoME space (the cropped template) resampled to ``spacing`` mm."""
    extent = np.array([hi - lo for lo, hi in CROP], dtype=float)
    shape = tuple(int(round(e / spacing)) for e in extent)
    voxel = extent / np.array(shape)
    first_centre = TEMPLATE_ORIGIN + np.array([lo for lo, _ in CROP]) - 0.5 + voxel / 2
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = first_centre
    return shape, affine  # type: ignore[return-value]


def template_volume(name: str) -> Tuple[np.ndarray, np.ndarray]:
    """A full 1 mm template volume of ``resources/mni152_2009a`` (``t1``, ``gm``, ``wm``, ``brainmask_from_MoME``)."""
    image = nib.load(RESOURCES / f"{name}.nii.gz")
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


@lru_cache(maxsize=4)
def template_maps(spacing: float) -> torch.Tensor:
    """CSF, GM, WM fractions and the brain mask of MoME space at ``spacing`` mm, shape (4, X, Y, Z)."""
    (x0, x1), (y0, y1), (z0, z1) = CROP

    def load(name: str) -> np.ndarray:
        return template_volume(name)[0][x0:x1, y0:y1, z0:z1]

    brain = load("brainmask_from_MoME")
    gm, wm = load("gm") / 255.0 * brain, load("wm") / 255.0 * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    maps = torch.from_numpy(np.stack([csf, gm, wm, brain]))[None]
    shape, _ = template_grid(spacing)
    return F.interpolate(maps, size=shape, mode="area")[0] if tuple(maps.shape[2:]) != shape else maps[0]


def mome_brain_mask(spacing: float) -> torch.Tensor:
    """MoME's brain mask on the MoME grid at ``spacing`` mm, a float (X, Y, Z) tensor of 0/1."""
    return (template_maps(spacing)[3] > 0.5).float()


def voxel_to_world(shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """``affine`` applied to every voxel index of ``shape``: an (X, Y, Z, 3) float32 tensor."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return ijk @ torch.from_numpy(np.asarray(affine)[:3, :3].T).float() + torch.from_numpy(affine[:3, 3]).float()


def sample_at_voxels(volume: torch.Tensor, voxel_coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Samples ``volume`` (C, X, Y, Z) at fractional voxel coordinates (..., 3) in (x, y, z) order; zero outside."""
    size = torch.tensor(volume.shape[1:], dtype=voxel_coords.dtype)
    normalised = 2.0 * voxel_coords / (size - 1).clamp_min(1) - 1.0
    grid = normalised.flip(-1)[None]  # grid_sample wants (W, H, D) = (z, y, x) order for a (C, X, Y, Z) input
    while grid.ndim < 5:
        grid = grid[:, None]
    out = F.grid_sample(volume[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out.reshape(volume.shape[0], *voxel_coords.shape[:-1])
