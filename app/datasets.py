"""Labelled NIfTI datasets for evaluation: find the cases, check their files, name their predictions.

Cases come from ``DIR/dataset.json`` (its ``"training"`` list, paths relative to ``DIR``) or, without one, from
``DIR/imagesTr/<case>_0000.nii.gz`` + ``DIR/labelsTr/<case>.nii.gz`` (``imagesTs``/``labelsTs`` if there is no
``imagesTr``), the modality then being the case id's suffix (``_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_dwi``).
MoME+ datasets list one image file per channel in each ``dataset.json`` entry (:func:`is_multichannel`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from app.errors import InputRejected
from app.nifti_io import nifti_stem
from operators.modality_router import MODALITIES

__all__ = [
    "Case",
    "check_same_grid",
    "discover_cases",
    "is_multichannel",
    "modality_of",
    "prediction_path",
    "select_cases",
]

MODALITY_RE = re.compile(rf"_({'|'.join(MODALITIES)})$", re.IGNORECASE)
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class Case:
    """One labelled image of the dataset."""

    case: str
    modality: str
    image: Path
    label: Path
    lesion_type: str | None = None


def modality_of(case_id: str) -> str:
    """The modality encoded as the case id's suffix (``..._flair`` -> ``flair``), else ``unknown``."""
    match = MODALITY_RE.search(case_id)
    return match.group(1).lower() if match else "unknown"


def prediction_path(pred_dir: Path, image: Path) -> Path:
    """Where the bundle's ``SaveImaged`` (postfix ``seg``) writes the prediction of ``image``."""
    return pred_dir / f"{nifti_stem(image)}_seg.nii.gz"


def _cases_from_datalist(data_dir: Path, dataset_json: Path) -> list[Case]:
    from monai.data import load_decathlon_datalist

    cases = []
    for item in load_decathlon_datalist(dataset_json, data_list_key="training", base_dir=data_dir):
        if not isinstance(item.get("image"), str) or not isinstance(item.get("label"), str):
            raise InputRejected(f"{dataset_json}: every training entry needs one 'image' and one 'label' path.")
        image, label = Path(item["image"]), Path(item["label"])
        case_id = str(item.get("case") or nifti_stem(label))
        modality = str(item.get("modality") or modality_of(case_id)).lower()
        cases.append(Case(case_id, modality, image, label, item.get("lesion_type")))
    return cases


def _cases_from_folders(data_dir: Path) -> list[Case]:
    split = "Tr" if (data_dir / "imagesTr").is_dir() else "Ts"
    images_dir, labels_dir = data_dir / f"images{split}", data_dir / f"labels{split}"
    cases = []
    for image in sorted(images_dir.glob("*_0000.nii*")):
        case_id = nifti_stem(image)[: -len("_0000")]
        cases.append(Case(case_id, modality_of(case_id), image, labels_dir / f"{case_id}.nii.gz"))
    return cases


def _has_training_list(dataset_json: Path) -> bool:
    try:
        content = json.loads(dataset_json.read_text())
    except (OSError, ValueError) as err:
        raise InputRejected(f"{dataset_json}: not readable JSON ({err}).") from err
    return isinstance(content, dict) and isinstance(content.get("training"), list)


def discover_cases(data_dir: Path) -> list[Case]:
    """The dataset's cases, from ``dataset.json`` if it has a ``training`` list, else from the nnU-Net folders."""
    dataset_json = data_dir / "dataset.json"
    if dataset_json.is_file() and _has_training_list(dataset_json):
        return _cases_from_datalist(data_dir, dataset_json)
    return _cases_from_folders(data_dir)


def select_cases(cases: list[Case], wanted: Sequence[str] | None, data_dir: Path) -> list[Case]:
    """Keeps the ``wanted`` cases (all when ``None``); rejects an empty dataset, unknown ids and missing files."""
    if not cases:
        raise InputRejected(f"{data_dir}: no cases found (no dataset.json training list, no imagesTr/imagesTs).")
    if wanted:
        unknown = sorted(set(wanted) - {c.case for c in cases})
        if unknown:
            raise InputRejected(f"{data_dir}: no such case(s): {', '.join(unknown)}.")
        cases = [c for c in cases if c.case in set(wanted)]
    stems = [nifti_stem(c.image) for c in cases]
    for case in cases:
        for kind, path in (("image", case.image), ("label", case.label)):
            if not path.is_file():
                raise InputRejected(f"{path}: {kind} of case {case.case} not found.")
        if stems.count(nifti_stem(case.image)) > 1:
            raise InputRejected(f"{case.image}: another image has the same file name; predictions would collide.")
    return cases


def check_same_grid(path: Path, reference: Path) -> None:
    """Rejects ``path`` unless its shape and affine equal those of ``reference`` (affine atol 1e-3)."""
    image, ref = nib.load(path), nib.load(reference)
    if image.shape != ref.shape:
        raise InputRejected(f"{path}: shape {image.shape} differs from {reference.name} {ref.shape}.")
    if not np.allclose(image.affine, ref.affine, atol=AFFINE_ATOL):
        raise InputRejected(f"{path}: affine differs from that of {reference.name} (not on the same voxel grid).")


def is_multichannel(data_dir: Path) -> bool:
    """Whether ``dataset.json`` lists MoME+ cases (one image file per channel)."""
    dataset_json = data_dir / "dataset.json"
    if not (dataset_json.is_file() and _has_training_list(dataset_json)):
        return False
    entries = json.loads(dataset_json.read_text())["training"]
    return bool(entries) and isinstance(entries[0].get("image"), list)
