"""Intensity handling that depends on neither the offset nor the scale of the stored values.

MR magnitude images have no absolute intensity unit, and the stored values reach the pipeline with whatever offset
and scale the scanner or a converter chose: ``RescaleIntercept -1000`` on 16-bit data, 32-bit storage with a large
negative offset, a NIfTI ``scl_inter``. MoME's own z-score is insensitive to them, but the steps before it are not:
the centre-of-mass start of the registration, the signal thresholds of its quality checks and MoME's brain mask
(which zeroes everything outside the brain, so a background of -1000 turns into a bright brain on a dark rim).
An outside robustness run of 0.9.1 found exactly that: registration checks at Dice 0.00 and 47-51 mL of "lesion"
outside the brain on an ordinary ``RescaleIntercept -1000``.

:func:`normalise_intensity` therefore maps every native volume, before anything else reads it, to a fixed range:
the background level (the ``BACKGROUND_PERCENTILE``-th percentile, which is air or the zeros around a skull-stripped
brain) becomes 0, the ``SCALE_PERCENTILE``-th percentile becomes ``NORMALISED_SCALE``, values below the background
are clipped to 0. The arithmetic runs in float64 slab by slab, so 32-bit data with offsets of 2**31 keep their
precision and memory stays bounded. A volume that is already zero-based (most MR) only changes scale, which neither
mutual information nor the z-score sees.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BACKGROUND_PERCENTILE",
    "NORMALISED_SCALE",
    "SCALE_PERCENTILE",
    "intensity_range",
    "normalise_intensity",
]

BACKGROUND_PERCENTILE = 0.5
SCALE_PERCENTILE = 99.5
NORMALISED_SCALE = 1000.0
SAMPLE_VOXELS = 2_000_000  # voxels the percentiles are estimated from (a regular subsample of larger volumes)
SLAB_VOXELS = 2**22  # voxels converted at once


def intensity_range(array: np.ndarray) -> tuple[float, float]:
    """(background level, bright level) of a volume: its robust low and high percentiles, in float64.

    Falls back to the minimum and maximum when the percentiles coincide (a volume that is almost all background).
    """
    flat = np.asarray(array).reshape(-1)
    sample = flat[:: max(1, flat.size // SAMPLE_VOXELS)].astype(np.float64)
    low, high = np.percentile(sample, [BACKGROUND_PERCENTILE, SCALE_PERCENTILE])
    if high <= low:
        low, high = float(flat.min()), float(flat.max())
    return float(low), float(high)


def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """A float32 copy of ``array`` with its background at 0 and its bright level at ``NORMALISED_SCALE``.

    Args:
        array: a native volume of any real dtype, finite (``validate_volume`` checks that first).

    Returns:
        float32 array of the same shape, values in ``[0, inf)``; all zeros for a constant volume.
    """
    array = np.asarray(array)
    low, high = intensity_range(array)
    scale = NORMALISED_SCALE / (high - low) if high > low else 0.0
    out = np.empty(array.shape, dtype=np.float32)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, SLAB_VOXELS):
        chunk = flat_in[start : start + SLAB_VOXELS].astype(np.float64)
        flat_out[start : start + SLAB_VOXELS] = np.maximum((chunk - low) * scale, 0.0)
    return out
