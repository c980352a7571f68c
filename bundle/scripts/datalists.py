"""Training datalists: reading dataset JSONs, the subject-level validation split and the in-memory case cache.

A dataset JSON is MONAI's decathlon format (``scripts.synthetic`` writes one) with a ``"modality"`` field per case
(single-contrast MoME and expert training) or, for MoME+, one file per channel in the order of ``channel_names``.
The modality of a case always comes from that field, never from its file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import Compose

from .losses import UNKNOWN_MODALITY
from .plus import AVAILABILITY_KEY

__all__ = [
    "cache_cases",
    "modality_index",
    "read_datalist",
    "read_plus_datalist",
    "split_by_subject",
]


def modality_index(modality: str, modalities: Sequence[str]) -> int:
    """Expert index of a modality id (case-insensitive).

    Args:
        modality: a modality id such as ``"FLAIR"``.
        modalities: modality ids in expert order.

    Returns:
        The index of ``modality`` in ``modalities``; ``-1`` (``UNKNOWN_MODALITY``) when it is not one of them.
    """
    lowered = [m.lower() for m in modalities]
    return lowered.index(modality.lower()) if modality and modality.lower() in lowered else UNKNOWN_MODALITY


def read_datalist(
    dataset_json: str | Sequence[str], modalities: Sequence[str] | None = None, key: str = "training"
) -> List[Dict[str, object]]:
    """Cases of one or more dataset JSONs (paths made absolute), optionally only those of ``modalities``.

    The modality of a case comes from its ``"modality"`` field, never from its file name. Several datasets (e.g.
    ``--dataset_json "['a/dataset.json', 'b/dataset.json']"``) are concatenated in the order given, each with paths
    relative to its own folder; a subject ID present in two of them is refused, as the validation split groups cases
    by subject and would join two different people.

    Args:
        dataset_json: path of a dataset JSON, or a sequence of them.
        modalities: keep only cases of these modalities (case-insensitive); ``None`` keeps all.
        key: the datalist key of the JSON (``"training"``).

    Returns:
        The case dicts (``image``, ``label``, ``modality`` and any other fields of the JSON).

    Raises:
        FileNotFoundError: a dataset JSON does not exist.
        ValueError: a case has no ``"modality"`` field, no case is left, or two datasets share a subject ID.
    """
    if not isinstance(dataset_json, (str, Path)):
        return _concatenate_datalists([read_datalist(str(j), modalities, key) for j in dataset_json], dataset_json)
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset JSON not found (make one with `python -m scripts.synthetic`).")
    cases = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(path.parent))
    missing = [c.get("image") for c in cases if "modality" not in c]
    if missing:
        raise ValueError(f"{path}: {len(missing)} cases have no 'modality' field, e.g. {missing[0]}.")
    if modalities is not None:
        wanted = {m.lower() for m in modalities}
        cases = [c for c in cases if str(c["modality"]).lower() in wanted]
    if not cases:
        raise ValueError(f"{path}: no cases with modality in {list(modalities or [])}.")
    return cases


def _subject(case: Dict[str, object]) -> str:
    """The subject ID of a case: ``subject``, else ``case``, else the image path."""
    return str(case.get("subject", case.get("case", case["image"])))


def _concatenate_datalists(datalists: Sequence[List[Dict[str, object]]], sources: Sequence[str]) -> List[Dict]:
    """The cases of several datalists in order; refuses a subject ID that two of them (``sources``) share."""
    if not datalists:
        raise ValueError("no dataset JSON given.")
    owner: Dict[str, str] = {}
    for cases, source in zip(datalists, sources):
        for subject in {_subject(c) for c in cases}:
            if owner.setdefault(subject, str(source)) != str(source):
                raise ValueError(f"subject {subject!r} is in both {owner[subject]} and {source}; rename one of them.")
    return [case for cases in datalists for case in cases]


def read_plus_datalist(dataset_json: str, modalities: Sequence[str], key: str = "training") -> List[Dict[str, object]]:
    """Multi-channel MoME+ cases of a dataset JSON (``image`` = one file per channel, paths made absolute).

    The dataset's channel order (``channel_names``) must equal ``modalities``: channels are matched by position,
    so a different order would feed every expert the wrong contrast.

    Args:
        dataset_json: path of the dataset JSON.
        modalities: the model's channel order, e.g. ``("t1", "t1ce", "t2", "flair")``.
        key: the datalist key of the JSON (``"training"``).

    Returns:
        The case dicts, each ``image`` a list of ``len(modalities)`` channel files.

    Raises:
        FileNotFoundError: the dataset JSON does not exist.
        ValueError: the channel order differs from ``modalities`` or a case lists the wrong number of files.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: dataset JSON not found (make one with `python -m scripts.synthetic --multichannel`)."
        )
    channels = [str(v).lower() for _, v in sorted(json.loads(path.read_text()).get("channel_names", {}).items())]
    if channels != [m.lower() for m in modalities]:
        raise ValueError(f"{path}: channels {channels} differ from the model's modalities {list(modalities)}.")
    cases = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(path.parent))
    wrong = [c["image"] for c in cases if not isinstance(c["image"], list) or len(c["image"]) != len(modalities)]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} cases do not list {len(modalities)} channel files, e.g. {wrong[0]}.")
    return cases


def split_by_subject(
    cases: Sequence[Dict[str, object]], val_fraction: float, seed: int, part: str
) -> List[Dict[str, object]]:
    """Deterministic train/validation split that keeps all contrasts of a subject on the same side.

    Args:
        cases: case dicts (grouped by :func:`_subject`).
        val_fraction: fraction of the subjects held out for validation; at least one and never all of them when
            positive, none when 0.
        seed: seed of the subject permutation.
        part: ``"train"`` or ``"val"``: which side to return.

    Returns:
        The cases of that side, in their original order.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}.")
    subjects = sorted({_subject(c) for c in cases})
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, int(round(val_fraction * len(subjects))))) if val_fraction > 0 else 0
    val = {subjects[i] for i in order[:n_val]}
    keep = (lambda s: s in val) if part == "val" else (lambda s: s not in val)
    return [c for c in cases if keep(_subject(c))]


def cache_cases(datalist: Sequence[Dict[str, object]], preprocessing: Compose) -> List[Dict[str, object]]:
    """Applies the deterministic preprocessing once and keeps the cases in memory (with their metadata fields).

    Args:
        datalist: case dicts as read by :func:`read_datalist` or :func:`read_plus_datalist`.
        preprocessing: the config's deterministic dictionary transforms (loading, orientation, spacing, norm).

    Returns:
        The cases with ``image`` and ``label`` as tensors (and the ``availability`` vector for MoME+ cases).
    """
    cached = []
    for item in datalist:
        data = preprocessing(dict(item))
        case = {**item, "image": torch.as_tensor(data["image"]), "label": torch.as_tensor(data["label"])}
        if AVAILABILITY_KEY in data:
            case[AVAILABILITY_KEY] = torch.as_tensor(data[AVAILABILITY_KEY]).float()
        cached.append(case)
    return cached
