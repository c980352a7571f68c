"""NIfTI in and out for the public API: read a native-space MR volume safely, write results with a clean header.

Reading (:func:`load_volume`) checks the declared shape against the input limits before any data are read, reads in
float64 and shifts the volume to start at 0 (large offsets keep their precision), and registers the header's free
text as patient data never to be echoed (:mod:`operators.phi`). Writing (:func:`save_nifti`) builds a new header that
carries the geometry only.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from app.errors import InputRejected
from operators import phi
from operators.limits import InputLimits, LimitExceeded, check_volume
from operators.modality_router import MODALITIES

__all__ = [
    "NIFTI_SUFFIXES",
    "guess_modality",
    "is_dicom_input",
    "load_channels",
    "load_volume",
    "nifti_stem",
    "save_nifti",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MODALITY_SUFFIX = re.compile(rf"[_-]({'|'.join(MODALITIES)})(?:_0000)?$", re.IGNORECASE)


def nifti_stem(path: Path) -> str:
    """The file name without ``.nii.gz`` / ``.nii``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def guess_modality(path: Path) -> str | None:
    """Modality from a file-name suffix such as ``_flair`` or ``_t1ce_0000``, else ``None``."""
    match = MODALITY_SUFFIX.search(nifti_stem(path))
    return match.group(1).lower() if match else None


def is_dicom_input(path: Path) -> bool:
    """A folder or a zip archive is DICOM input; a file is NIfTI."""
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def _zero_based(array: np.ndarray) -> np.ndarray:
    """float32 copy with the minimum subtracted in float64 first, so large offsets (``scl_inter``, 32-bit data) keep
    their precision; a volume with NaN or infinite values is only cast (the segmenter rejects it, naming the count)."""
    if not np.isfinite(array).all():
        return array.astype(np.float32)
    return (array - array.min()).astype(np.float32)


def load_volume(path: Path, limits: InputLimits | None = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Reads a NIfTI volume as float32 (X, Y, Z) with its RAS affine; rejects what cannot be a 3-D MR volume.

    The declared shape is checked against ``limits`` (default :meth:`InputLimits.from_env`) before any data are
    read, so a small ``.nii.gz`` declaring a huge volume costs nothing.

    Raises:
        InputRejected: the file is missing, not NIfTI, unreadable, over a limit or not one 3-D volume.
    """
    array, affine, header = _read_nifti(path, limits)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputRejected(f"{path}: expected one 3-D volume, got shape {array.shape}.")
    return array, affine, header


def load_channels(
    path: Path, max_channels: int, limits: InputLimits | None = None
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Reads a multi-channel NIfTI (X, Y, Z, C) — co-registered contrasts on one grid — as float32 with its affine.

    Each channel is shifted to start at 0 on its own (as :func:`load_volume` does for a volume); a 3-D file is one
    channel. The declared shape is checked before any data are read: each channel against ``limits``, the channel
    count against ``max_channels``.

    Raises:
        InputRejected: the file is missing, not NIfTI, unreadable, over a limit or not (X, Y, Z, C).
    """
    array, affine, header = _read_nifti(path, limits, max_channels)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise InputRejected(f"{path}: expected a 3-D volume with channels (X, Y, Z, C), got shape {array.shape}.")
    return array, affine, header


def _read_nifti(
    path: Path, limits: InputLimits | None, max_channels: int | None = None
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """The checked, zero-based float32 data of a NIfTI file; with ``max_channels``, of each of its channels."""
    if not path.is_file():
        raise InputRejected(f"{path}: file not found.")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputRejected(f"{path}: not a NIfTI file (.nii/.nii.gz); give DICOM as a folder or a zip.")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise InputRejected(f"{path}: cannot be read as NIfTI ({error}).") from error
    phi.register_nifti_header(image.header)  # its free text (descrip...) may hold a name: never echoed
    per_channel = max_channels is not None
    try:
        check_volume(image.shape[:3] if per_channel else image.shape, str(path), limits or InputLimits.from_env())
    except LimitExceeded as error:
        raise InputRejected(str(error)) from error
    if per_channel and len(image.shape) == 4 and image.shape[3] > max_channels:
        raise InputRejected(f"{path}: {image.shape[3]} channels, more than the {max_channels} expected.")
    try:
        data = np.asarray(image.dataobj, dtype=np.float64)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise InputRejected(f"{path}: cannot be read as NIfTI ({error}).") from error
    if per_channel and data.ndim == 4:
        return np.stack([_zero_based(data[..., c]) for c in range(data.shape[3])], axis=-1), image.affine, image.header
    return _zero_based(data), image.affine, image.header


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, like: nib.Nifti1Header | None = None) -> None:
    """Writes ``data`` with a new header holding the geometry only: ``affine`` as qform and sform (with ``like``'s
    codes) and ``like``'s units. No text field of the input header (``descrip``, ``aux_file``...) is copied."""
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(data.dtype)
    if like is not None:
        image.set_qform(affine, code=int(like["qform_code"]) or 1)
        image.set_sform(affine, code=int(like["sform_code"]) or 1)
        image.header.set_xyzt_units(*like.get_xyzt_units())
    nib.save(image, path)
