"""MoME+ data handling: multi-channel cases with missing modalities, availability vectors, batch preparation.

MoME+ takes the modalities of one subject in a fixed channel order (``modalities`` of the config; the authors'
order is T1, T1ce, T2, FLAIR) plus an availability vector ``c``. A case is given as one file per channel, nnU-Net
style ``<case>_<k:04d>.nii.gz``; a channel is missing when its file is absent (``None`` in a datalist) or when the
image is identically zero. All present channels must share one voxel grid (shape and affine): channels of a study
are co-registered beforehand, never silently combined.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

__all__ = [
    "AVAILABILITY_KEY",
    "LoadModalitiesd",
    "availability_patterns",
    "multichannel_datalist",
    "pattern_name",
    "prepare_plus_batch",
]

logger = logging.getLogger(__name__)

AVAILABILITY_KEY = "availability"
AFFINE_TOLERANCE_MM = 1e-3
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


def availability_patterns(num_modalities: int) -> List[Tuple[int, ...]]:
    """The ``2^M - 1`` non-empty availability vectors, in binary counting order (15 for ``M = 4``).

    Pattern ``n`` (1-based) has modality ``j`` available iff bit ``M - 1 - j`` of ``n`` is set, so the list starts
    with the last modality alone and ends with all of them.
    """
    m = int(num_modalities)
    if m < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}.")
    return [tuple((n >> (m - 1 - j)) & 1 for j in range(m)) for n in range(1, 2**m)]


def pattern_name(availability: Sequence[float], modalities: Sequence[str]) -> str:
    """``"t1+flair"`` for the available modalities of an availability vector."""
    names = [name for name, flag in zip(modalities, availability) if float(flag) > 0]
    return "+".join(names) if names else "none"


def multichannel_datalist(folder: str | Path, modalities: Sequence[str]) -> List[Dict[str, Any]]:
    """Groups nnU-Net channel files ``<case>_<k:04d>.nii[.gz]`` of ``folder`` into MoME+ cases.

    A folder that does not exist gives no cases (with a warning); an existing folder without channel files is an error.

    Returns one ``{"case", "image": [path or None per channel]}`` per case, sorted by case name. A file whose channel
    index is not below ``len(modalities)`` is an error (it would be silently ignored otherwise).
    """
    folder = Path(folder)
    if not folder.is_dir():  # like the glob of inference.json: nothing to do (e.g. when MONAI checks properties)
        logger.warning("%s: input folder not found; no cases.", folder)
        return []
    cases: Dict[str, List[str | None]] = {}
    for path in sorted(folder.iterdir()):
        match = _CHANNEL_FILE.match(path.name)
        if not match:
            continue
        channel = int(match["channel"])
        if channel >= len(modalities):
            raise ValueError(
                f"{path}: channel {channel}, but the model has {len(modalities)} ({', '.join(modalities)})."
            )
        cases.setdefault(match["case"], [None] * len(modalities))[channel] = str(path)
    if not cases:
        raise ValueError(f"{folder}: no channel files named <case>_<k:04d>.nii.gz.")
    return [{"case": case, "image": files} for case, files in sorted(cases.items())]


class LoadModalitiesd(MapTransform):
    """Loads a MoME+ case: channel files (``None`` = missing) -> ``(M, ...)`` image and an availability vector.

    Missing channels are zero-filled; a present but identically zero channel counts as missing. Every present
    channel must have the shape and affine of the first one (within ``AFFINE_TOLERANCE_MM``), else the case is
    rejected with the file and the difference. The image keeps the first present channel's metadata, with
    ``filename_or_obj`` set to ``<folder>/<case>.nii.gz`` so outputs are named after the case.

    Args:
        keys: the image key (one key; its value is a list of ``M`` paths or ``None``).
        num_modalities: ``M``.
        availability_key: where the ``(M,)`` float32 availability vector goes.
        case_key: datalist field with the case name (default: derived from the first file name).
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_modalities: int,
        availability_key: str = AVAILABILITY_KEY,
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_modalities = int(num_modalities)
        self.availability_key = availability_key
        self.case_key = case_key
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            files = d[key]
            if isinstance(files, (str, Path)):
                files = [files]
            files = [None if f in (None, "") else str(f) for f in files]
            if len(files) != self.num_modalities:
                raise ValueError(f"{files}: {len(files)} channel files for a model with {self.num_modalities}.")
            image, availability = self._stack(files, d.get(self.case_key))
            d[key], d[self.availability_key] = image, availability
        return d

    def _stack(self, files: Sequence[str | None], case: Any) -> Tuple[MetaTensor, torch.Tensor]:
        present = [(index, path) for index, path in enumerate(files) if path is not None]
        if not present:
            raise ValueError(f"case {case}: no channel file is present.")
        reference: MetaTensor | None = None
        channels: List[torch.Tensor | None] = [None] * len(files)
        for index, path in present:
            volume = self.loader(path)
            if volume.shape[0] != 1:
                raise ValueError(f"{path}: {volume.shape[0]} channels in one channel file; expected a 3-D image.")
            if reference is None:
                reference = volume
            else:
                _check_same_grid(volume, reference, path, files[present[0][0]])
            channels[index] = volume.as_tensor()[0].float()
        assert reference is not None
        zeros = torch.zeros(reference.shape[1:], dtype=torch.float32)
        stacked = torch.stack([zeros if c is None else c for c in channels])
        availability = (stacked.flatten(1).abs().amax(1) > 0).float()
        if availability.sum() == 0:
            raise ValueError(f"case {case}: every channel is missing or identically zero.")
        meta = dict(reference.meta)
        name = str(case) if case else Path(present[0][1]).name.split(".nii")[0].rsplit("_", 1)[0]
        meta["filename_or_obj"] = str(Path(present[0][1]).parent / f"{name}.nii.gz")
        return MetaTensor(stacked, meta=meta), availability


def _check_same_grid(volume: MetaTensor, reference: MetaTensor, path: str, reference_path: str | None) -> None:
    if tuple(volume.shape[1:]) != tuple(reference.shape[1:]):
        raise ValueError(
            f"{path}: shape {tuple(volume.shape[1:])} differs from {reference_path} {tuple(reference.shape[1:])}; "
            "MoME+ channels must be co-registered onto one grid."
        )
    difference = float(np.abs(np.asarray(volume.affine) - np.asarray(reference.affine)).max())
    if difference > AFFINE_TOLERANCE_MM:
        raise ValueError(
            f"{path}: affine differs from {reference_path} by up to {difference:.4g} mm; MoME+ channels must be "
            "co-registered onto one grid."
        )


def prepare_plus_batch(batchdata: Dict[str, Any], device: Any = None, non_blocking: bool = False, **kwargs: Any):
    """``prepare_batch`` for MONAI engines: ``(image, label or None, (), {"availability": c})``.

    The availability vector reaches the network through the inferer's keyword arguments (per tile).
    """
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    label = batchdata.get("label")
    if label is not None:
        label = label.to(device=device, non_blocking=non_blocking)
    availability = torch.as_tensor(batchdata[AVAILABILITY_KEY]).to(device=device).float()
    return image, label, (), {AVAILABILITY_KEY: availability.reshape(image.shape[0], -1)}
