"""Synthetic multi-modal brain-lesion data on real anatomy, in MoME space.

Every subject starts from the MNI152 2009a grey/white-matter maps (``resources/mni152_2009a``), warped by a random
affine and a smooth deformation so that no two brains are alike. One lesion type is drawn per subject and built as soft
compartments (glioma: necrotic core, enhancing rim, oedema; acute/chronic ischaemic stroke; white-matter
hyperintensities). The subject is then rendered with per-tissue and per-compartment intensities, a bias field, Rician
noise, a random point-spread function (slice thickness), gamma and scale into the contrasts in which the public
datasets MoME was trained on image and label that lesion type (``LESION_CONTRASTS``: glioma as BraTS in T1, T1ce, T2
and FLAIR; acute stroke as ISLES in DWI; chronic stroke as ATLAS in T1; WMH/MS as WMH2017 and MSSEG in T1, T1ce, T2
and FLAIR), or into every contrast with ``--all-contrasts``. The label is the whole lesion (MoME's single "lesion"
class), identical for all contrasts of a subject.

Output (nnU-Net layout; one case per subject and contrast)::

    OUT/imagesTr/<subject>_<modality>_0000.nii.gz   int16, brain-masked, MoME space (or a native grid, --native)
    OUT/labelsTr/<subject>_<modality>.nii.gz        uint8 0/1 on the image grid
    OUT/dataset.json                               nnU-Net fields + "training": one entry per case with its modality

MoME+ layout (``--multichannel``; one case per subject with every ``--modalities`` contrast, nnU-Net channel files)::

    OUT/imagesTr/<subject>_<k:04d>.nii.gz          channel k = k-th of --modalities (default t1 t1ce t2 flair)
    OUT/labelsTr/<subject>.nii.gz                  whole lesion 0/1, or with ``--label-scheme brats`` the BraTS
                                                   sub-regions 1 necrotic core, 2 oedema, 3 enhancing (glioma only)

Command line (from the bundle root)::

    python -m scripts.synthetic --out DIR --cases N --seed S [--spacing 2] [--modalities t1 flair] [--native]
                                [--lesion-types glioma=1,wmh=2] [--all-contrasts]
                                [--multichannel] [--label-scheme binary|brats]

Each subject is generated from ``numpy.random.default_rng([seed, index])`` only, so a dataset is reproducible and
subject ``i`` does not depend on ``--cases``; ``regenerate_subject`` rebuilds a subject's tissue maps and lesion
from the dataset JSON's ``generator`` record (the project's error analysis by tissue uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .metrics import voxel_ml
from .networks import MODALITIES, PLUS_MODALITIES  # MoME's expert order and MoME+'s channel order
from .template import TISSUE_SIGNAL, sample_at_voxels, template_grid, template_maps, voxel_to_world

__all__ = [
    "BRATS_LABELS",
    "GENERATOR_VERSION",
    "PLUS_MODALITIES",
    "LESION_CONTRASTS",
    "LESION_TYPES",
    "MODALITIES",
    "Subject",
    "generate_dataset",
    "generate_subject",
    "main",
    "regenerate_subject",
    "render",
    "template_grid",
]

GENERATOR_VERSION = "1.4"
BINARY_LABELS = {"background": 0, "lesion": 1}
# BraTS sub-regions (label 4 of BraTS <= 2021 mapped to 3, as the MoME+ authors' 4-class experts imply).
BRATS_LABELS = {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing": 3}
LESION_TYPES = ("glioma", "stroke_acute", "stroke_chronic", "wmh")
# Contrasts in which each lesion type is imaged and labelled in MoME's training datasets (mome-method.md section 3.1):
# BraTS (glioma) and MSSEG (MS) in T1/T1ce/T2/FLAIR, WMH2017 in T1/FLAIR, ATLAS (chronic stroke) in T1, ISLES (acute
# stroke) in DWI.
LESION_CONTRASTS: Dict[str, Tuple[str, ...]] = {
    "glioma": ("t1", "t1ce", "t2", "flair"),
    "stroke_acute": ("dwi",),
    "stroke_chronic": ("t1",),
    "wmh": ("t1", "t1ce", "t2", "flair"),
}
# Per 100 subjects this gives about 70 T1, 55 T1ce, 55 T2, 55 FLAIR and 30 DWI cases.
DEFAULT_LESION_WEIGHTS = {"glioma": 0.3, "stroke_acute": 0.3, "stroke_chronic": 0.15, "wmh": 0.25}

# Relative signal of each lesion compartment per contrast (order of MODALITIES).
COMPARTMENT_SIGNAL: Dict[str, Tuple[float, float, float, float, float]] = {
    "oedema": (0.48, 0.48, 0.85, 0.95, 0.66),
    "enhancing": (0.52, 1.25, 0.72, 0.80, 0.68),
    "necrosis": (0.28, 0.30, 0.95, 0.40, 0.30),
    "acute_infarct": (0.45, 0.45, 0.82, 0.88, 1.25),
    "chronic_cavity": (0.26, 0.27, 0.95, 0.18, 0.22),
    "gliosis": (0.45, 0.45, 0.85, 0.92, 0.68),
    "wmh": (0.45, 0.45, 0.88, 1.00, 0.72),
}
# Compartments of each lesion type, painted in this order (later ones on top).
LESION_COMPARTMENTS = {
    "glioma": ("oedema", "enhancing", "necrosis"),
    "stroke_acute": ("acute_infarct",),
    "stroke_chronic": ("gliosis", "chronic_cavity"),
    "wmh": ("wmh",),
}


@dataclass
class Subject:
    """One synthetic subject: tissue maps, lesion compartments and the whole-lesion label on a grid."""

    tissues: np.ndarray  # (3, X, Y, Z) CSF, GM, WM fractions
    brain: np.ndarray  # (X, Y, Z) brain mask in [0, 1]
    compartments: Dict[str, np.ndarray]  # name -> (X, Y, Z) membership in [0, 1]
    label: np.ndarray  # (X, Y, Z) uint8
    lesion_type: str
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    regions: np.ndarray | None = None  # (X, Y, Z) uint8 BraTS sub-regions (glioma only), see BRATS_LABELS


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], control: Sequence[int]) -> torch.Tensor:
    """Zero-mean, unit-variance random field that varies on the scale of ``shape / control``."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1, *control)).astype(np.float32))
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def _rotation(angles: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warped_anatomy(rng: np.random.Generator, spacing: float) -> torch.Tensor:
    """The template maps under a random affine (scale, rotation, shift) and a smooth deformation."""
    maps = template_maps(spacing)
    shape = maps.shape[1:]
    scale = rng.uniform(0.92, 1.08, size=3)
    matrix = _rotation(np.deg2rad(rng.uniform(-6, 6, size=3))) @ np.diag(1.0 / scale)
    shift_vox = rng.uniform(-4, 4, size=3) / spacing
    centre = (np.array(shape) - 1) / 2
    coords = voxel_to_world(shape, np.eye(4))  # voxel indices
    mapped = (coords - torch.from_numpy(centre).float()) @ torch.from_numpy(matrix.T).float()
    mapped = mapped + torch.from_numpy(centre + shift_vox).float()
    control = tuple(max(2, int(round(n * spacing / 40))) for n in shape)
    amplitude = rng.uniform(1.0, 3.0) / spacing
    displacement = torch.stack([_smooth_noise(rng, shape, control) for _ in range(3)], dim=-1) * amplitude
    return sample_at_voxels(maps, mapped + displacement)


def _pick_centre(rng: np.random.Generator, weight: torch.Tensor, world: torch.Tensor) -> np.ndarray:
    flat = weight.flatten().double().clamp_min(0)
    probabilities = (flat / flat.sum()).numpy()
    index = rng.choice(flat.numel(), p=probabilities)
    return world.reshape(-1, 3)[index].numpy().astype(float)


def _blob(
    rng: np.random.Generator, world: torch.Tensor, centre: np.ndarray, radii: np.ndarray, roughness: float
) -> torch.Tensor:
    """Normalised distance field of a randomly oriented, irregular ellipsoid (1 on its surface)."""
    rotation = torch.from_numpy(_rotation(rng.uniform(-math.pi, math.pi, size=3))).float()
    local = (world - torch.from_numpy(centre).float()) @ rotation / torch.from_numpy(radii).float()
    distance = local.norm(dim=-1)
    control = tuple(max(2, int(round(n / 6))) for n in world.shape[:3])
    return distance * (1.0 + roughness * torch.tanh(_smooth_noise(rng, world.shape[:3], control)))


def _membership(distance: torch.Tensor, edge: float = 0.08) -> torch.Tensor:
    return torch.sigmoid((1.0 - distance) / edge)


def _glioma(rng, world, tissues, brain) -> Dict[str, torch.Tensor]:
    wm = tissues[2]
    centre = _pick_centre(rng, (wm > 0.6).float() * brain, world)
    radius = rng.uniform(9.0, 22.0)
    core = _blob(rng, world, centre, radius * rng.uniform(0.8, 1.2, size=3), 0.25)
    oedema = _blob(rng, world, centre, radius * rng.uniform(1.4, 2.2, size=3), 0.35)
    spread = (wm + 0.35 * tissues[1]).clamp(0, 1) * brain  # oedema follows white matter
    necrotic = rng.uniform(0.3, 0.7) if rng.random() < 0.8 else 0.0
    compartments = {
        "oedema": _membership(oedema) * spread,
        "enhancing": _membership(core) * brain,
        "necrosis": _membership(core / max(necrotic, 1e-3)) * brain if necrotic else torch.zeros_like(brain),
    }
    return compartments


def _stroke(rng, world, tissues, brain, chronic: bool) -> Dict[str, torch.Tensor]:
    parenchyma = (tissues[1] + tissues[2]).clamp(0, 1) * brain
    first = _pick_centre(rng, (parenchyma > 0.8).float(), world)
    lesion = torch.zeros_like(brain)
    for _ in range(int(rng.integers(1, 4))):
        centre = first + rng.normal(0, 10.0, size=3)
        radii = rng.uniform(6.0, 18.0) * rng.uniform(0.6, 1.3, size=3)
        lesion = torch.maximum(lesion, _membership(_blob(rng, world, centre, radii, 0.35)))
    lesion = lesion * parenchyma.clamp(0, 1) ** 0.5
    if not chronic:
        return {"acute_infarct": lesion}
    cavity = ((lesion - 0.5) * 2).clamp(0, 1) ** 2 * rng.uniform(0.6, 1.0)
    return {"gliosis": lesion, "chronic_cavity": cavity}


def _wmh(rng, world, tissues, brain) -> Dict[str, torch.Tensor]:
    wm = tissues[2]
    # Periventricular preference: closer to the lateral ventricles (around MNI (0, -15, 15)) is likelier.
    distance = (world - torch.tensor([0.0, -15.0, 15.0])).norm(dim=-1)
    weight = (wm > 0.7).float() * brain * torch.exp(-((distance / 35.0) ** 2))
    lesion = torch.zeros_like(brain)
    for _ in range(int(rng.integers(4, 20))):
        centre = _pick_centre(rng, weight, world)
        radii = rng.uniform(3.0, 9.0) * rng.uniform(0.6, 1.5, size=3)
        lesion = torch.maximum(lesion, _membership(_blob(rng, world, centre, radii, 0.2)))
    return {"wmh": lesion * (wm + 0.2).clamp(0, 1) * brain}


def generate_subject(
    rng: np.random.Generator, spacing: float = 2.0, lesion_weights: Dict[str, float] | None = None
) -> Subject:
    """Anatomy, lesion compartments and label of one subject in MoME space at ``spacing`` mm."""
    weights = lesion_weights or DEFAULT_LESION_WEIGHTS
    names = sorted(weights)
    probabilities = np.array([weights[n] for n in names], dtype=float)
    lesion_type = names[rng.choice(len(names), p=probabilities / probabilities.sum())]
    maps = _warped_anatomy(rng, spacing)
    tissues, brain = maps[:3], maps[3]
    brain = (brain > 0.5).float()
    tissues = tissues * brain
    shape, affine = template_grid(spacing)
    world = voxel_to_world(shape, affine)
    if lesion_type == "glioma":
        compartments = _glioma(rng, world, tissues, brain)
    elif lesion_type in ("stroke_acute", "stroke_chronic"):
        compartments = _stroke(rng, world, tissues, brain, chronic=lesion_type == "stroke_chronic")
    else:
        compartments = _wmh(rng, world, tissues, brain)
    whole = torch.stack(list(compartments.values())).amax(0)
    label = ((whole > 0.5) & (brain > 0)).to(torch.uint8)
    regions = _brats_regions(compartments, label) if lesion_type == "glioma" else None
    return Subject(
        tissues=tissues.numpy(),
        brain=brain.numpy(),
        compartments={k: v.numpy() for k, v in compartments.items()},
        label=label.numpy(),
        lesion_type=lesion_type,
        affine=affine,
        regions=None if regions is None else regions.numpy(),
    )


def regenerate_subject(generator: dict, subject: str) -> Subject:
    """Rebuilds subject ``syn_s<seed>_<index>`` of a dataset from its JSON ``generator`` record.

    Only datasets of this generator version in MoME space can be rebuilt: another version may draw differently, and a
    native-space case is resampled onto a grid the subject alone does not give.

    Raises:
        ValueError: the record is of another version or space, or the subject is not of the record's seed.
    """
    if generator.get("version") != GENERATOR_VERSION or generator.get("space") != "mome":
        raise ValueError(
            f"only MoME-space datasets of generator {GENERATOR_VERSION} can be rebuilt; this one is version "
            f"{generator.get('version')!r} in space {generator.get('space')!r}."
        )
    match = re.fullmatch(r"syn_s(\d+)_(\d+)", subject)
    if match is None or int(match.group(1)) != generator.get("seed"):
        raise ValueError(f"{subject!r} is not a subject of seed {generator.get('seed')}.")
    rng = np.random.default_rng([generator["seed"], int(match.group(2))])
    return generate_subject(rng, float(generator["spacing_mm"]), generator.get("lesion_weights"))


def _brats_regions(compartments: Dict[str, torch.Tensor], whole: torch.Tensor) -> torch.Tensor:
    """BraTS labels inside the whole-lesion mask, with the rendering's overlay order (necrosis over enhancing over
    oedema): necrotic core 1, enhancing 3, the rest of the lesion oedema 2."""
    regions = torch.where(whole > 0, 2, 0)
    regions = torch.where((whole > 0) & (compartments["enhancing"] > 0.5), 3, regions)
    regions = torch.where((whole > 0) & (compartments["necrosis"] > 0.5), 1, regions)
    return regions.to(torch.uint8)


def _gaussian_blur(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of an (X, Y, Z) tensor with per-axis sigma in voxels."""
    out = volume[None, None]
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        radius = int(math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).reshape([1, 1] + [len(taps) if a == axis else 1 for a in range(3)])
        padding = [radius if a == axis else 0 for a in range(3)]
        out = F.conv3d(F.pad(out, [p for a in reversed(padding) for p in (a, a)], mode="replicate"), kernel)
    return out[0, 0]


def render(subject: Subject, modality: str, rng: np.random.Generator) -> np.ndarray:
    """One contrast of a subject: float32 image in arbitrary scanner units, zero outside the brain."""
    index = MODALITIES.index(modality)
    tissue_signal = np.array(TISSUE_SIGNAL[modality]) * rng.uniform(0.92, 1.08, size=3)
    tissues = torch.from_numpy(subject.tissues)
    brain = torch.from_numpy(subject.brain)
    total = tissues.sum(0).clamp_min(1e-3)
    image = (tissues * torch.from_numpy(tissue_signal).float()[:, None, None, None]).sum(0) / total
    shape = image.shape
    texture = _smooth_noise(rng, shape, tuple(max(2, n // 3) for n in shape))
    image = image * (1.0 + 0.03 * texture)
    for name, membership in subject.compartments.items():
        value = COMPARTMENT_SIGNAL[name][index] * rng.uniform(0.88, 1.12)
        alpha = torch.from_numpy(membership)
        image = image * (1 - alpha) + value * alpha * (1.0 + 0.04 * texture)
    thick_axis = int(rng.integers(0, 3))
    sigmas = [rng.uniform(0.0, 0.5) for _ in range(3)]
    sigmas[thick_axis] = rng.uniform(0.3, 1.2)
    image = _gaussian_blur(image * brain, sigmas)
    image = image * torch.exp(0.12 * _smooth_noise(rng, shape, (3, 3, 3)))
    noise = rng.uniform(0.015, 0.05)
    real = image + noise * torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    imaginary = noise * torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    image = torch.sqrt(real**2 + imaginary**2) ** rng.uniform(0.85, 1.2)
    image = image * brain * rng.uniform(300.0, 1500.0)
    return image.numpy().astype(np.float32)


def _native_grid(rng: np.random.Generator, affine: np.ndarray, shape: Sequence[int]) -> Tuple[np.ndarray, tuple]:
    """A random scanner grid around the brain: rotation <= 20 deg, shift <= 20 mm, scale 0.9-1.1, thick slices.

    Returns the native affine (voxel -> native RAS mm) and shape. The native world is the template world moved by a
    rigid+scale transform; ``native_to_template`` in the dataset JSON maps native mm to MoME-space mm.
    """
    spacing = np.abs(np.diag(affine)[:3]) * np.array([1.0, 1.0, rng.uniform(1.5, 2.5)])
    extent = np.array(shape) * np.abs(np.diag(affine)[:3]) * 1.25
    native_shape = tuple(int(math.ceil(e / s)) for e, s in zip(extent, spacing))
    direction = _rotation(np.deg2rad(rng.uniform(-20, 20, size=3)))
    native = np.eye(4)
    native[:3, :3] = direction @ np.diag(spacing)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    native[:3, 3] = centre - native[:3, :3] @ ((np.array(native_shape) - 1) / 2)
    return native, native_shape


def _to_native(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, affine: np.ndarray, head_scale: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resamples an image/label pair from MoME space onto a random native grid (linear; each label value's fraction
    interpolated linearly, the largest wins, so BraTS sub-regions keep their values).

    The native world differs from the template world by a random rotation and shift (the patient's position in this
    series) and by ``head_scale`` (the subject's head size; one value for every series of a subject, since series of
    one head differ only rigidly).
    """
    native_affine, native_shape = _native_grid(rng, affine, image.shape)
    transform = np.eye(4)  # native mm -> template mm
    transform[:3, :3] = _rotation(np.deg2rad(rng.uniform(-20, 20, size=3))) * head_scale
    rng.uniform(0.9, 1.1)  # generator <= 1.3 drew the scale per series here; still drawn so the stream is unchanged
    transform[:3, 3] = rng.uniform(-20, 20, size=3)
    voxel = np.linalg.inv(affine) @ transform @ native_affine  # native voxel -> MoME-space voxel
    coords = voxel_to_world(native_shape, voxel)
    values = [int(v) for v in np.unique(label) if v != 0] or [1]
    volume = torch.from_numpy(np.stack([image, *[(label == v).astype(np.float32) for v in values]]))
    moved = sample_at_voxels(volume, coords).numpy()
    # each label value's fraction, linearly interpolated; the largest wins (binary: fraction > 0.5)
    fractions = np.concatenate([1.0 - moved[1:].sum(0, keepdims=True), moved[1:]])
    native_label = np.asarray([0, *values], dtype=np.uint8)[np.argmax(fractions, axis=0)]
    return moved[0], native_label, native_affine, transform


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _lesion_summary(label: np.ndarray, affine: np.ndarray) -> float:
    return round(float(label.sum()) * voxel_ml(affine), 3)


def generate_dataset(
    out: Path,
    cases: int,
    seed: int,
    spacing: float = 2.0,
    modalities: Sequence[str] = MODALITIES,
    lesion_weights: Dict[str, float] | None = None,
    native: bool = False,
    progress: bool = False,
    all_contrasts: bool = False,
    multichannel: bool = False,
    label_scheme: str = "binary",
) -> Path:
    """Writes ``cases`` subjects to ``out`` and returns the dataset JSON path.

    Each subject gives one case per contrast in ``modalities`` that its lesion type is imaged in
    (``LESION_CONTRASTS``), or per contrast in ``modalities`` when ``all_contrasts`` is set. With ``multichannel``
    each subject is one case holding every contrast of ``modalities`` as nnU-Net channel files (MoME+ training).
    ``label_scheme="brats"`` writes the BraTS sub-regions (``BRATS_LABELS``) and needs glioma-only subjects.
    """
    if label_scheme not in ("binary", "brats"):
        raise ValueError(f"label_scheme must be 'binary' or 'brats', got {label_scheme!r}.")
    if label_scheme == "brats" and set(lesion_weights or DEFAULT_LESION_WEIGHTS) != {"glioma"}:
        raise ValueError("BraTS sub-region labels exist for gliomas only; use --lesion-types glioma=1.")
    if multichannel and native:
        raise ValueError("--multichannel writes co-registered channels in MoME space; --native is not supported.")
    images, labels = out / "imagesTr", out / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    entries: List[dict] = []
    started = time.time()
    for index in range(cases):
        rng = np.random.default_rng([seed, index])
        subject = generate_subject(rng, spacing, lesion_weights)
        name = f"syn_s{seed}_{index:04d}"
        label = subject.regions if label_scheme == "brats" else subject.label
        head_scale = float(np.random.default_rng([seed, index, 1]).uniform(0.9, 1.1))  # own stream: rng unchanged
        if multichannel:
            entries.append(_write_multichannel_case(out, name, subject, label, modalities, rng))
        else:
            contrasts = (
                modalities if all_contrasts else [m for m in modalities if m in LESION_CONTRASTS[subject.lesion_type]]
            )
            for modality in contrasts:
                entries.append(_write_case(out, name, subject, label, modality, rng, native, head_scale))
        if progress:
            elapsed = time.time() - started
            print(f"\r[{index + 1}/{cases}] subjects, {elapsed:.0f} s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    channels = list(modalities) if multichannel else ["MR"]
    dataset = {
        "name": "MoMESynthetic",
        "description": "Synthetic multi-modal brain lesions on MNI152 2009a anatomy (scripts/synthetic.py).",
        "licence": "CC0 (generated data); anatomy: MNI ICBM152 2009a notice, see resources/mni152_2009a",
        "channel_names": {str(k): name for k, name in enumerate(channels)},
        "labels": BRATS_LABELS if label_scheme == "brats" else BINARY_LABELS,
        "numTraining": len(entries),
        "file_ending": ".nii.gz",
        "modalities": list(modalities),
        "generator": {
            "version": GENERATOR_VERSION,
            "seed": seed,
            "subjects": cases,
            "spacing_mm": spacing,
            "space": "native" if native else "mome",
            "lesion_weights": lesion_weights or DEFAULT_LESION_WEIGHTS,
            "contrasts": "all" if all_contrasts or multichannel else LESION_CONTRASTS,
            "layout": "multichannel" if multichannel else "one case per contrast",
            "label_scheme": label_scheme,
        },
        "training": entries,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(dataset, indent=1))
    return path


def _write_case(
    out: Path,
    name: str,
    subject: Subject,
    label: np.ndarray,
    modality: str,
    rng: np.random.Generator,
    native: bool,
    head_scale: float,
) -> dict:
    """One single-contrast case (MoME layout); returns its dataset entry."""
    image, affine = render(subject, modality, rng), subject.affine
    entry = {"case": f"{name}_{modality}", "subject": name, "modality": modality, "lesion_type": subject.lesion_type}
    if native:
        image, label, affine, transform = _to_native(rng, image, label, affine, head_scale)
        entry["native_to_template"] = np.round(transform, 6).tolist()
    entry["image"] = f"imagesTr/{name}_{modality}_0000.nii.gz"
    entry["label"] = f"labelsTr/{name}_{modality}.nii.gz"
    entry["lesion_ml"] = _lesion_summary(label > 0, affine)
    _save(out / entry["image"], np.round(image), affine, np.int16)
    _save(out / entry["label"], label, affine, np.uint8)
    return entry


def _write_multichannel_case(
    out: Path, name: str, subject: Subject, label: np.ndarray, modalities: Sequence[str], rng: np.random.Generator
) -> dict:
    """One subject with every contrast as channel files ``<name>_<k:04d>`` (MoME+ layout); returns its entry."""
    paths = []
    for channel, modality in enumerate(modalities):
        paths.append(f"imagesTr/{name}_{channel:04d}.nii.gz")
        _save(out / paths[-1], np.round(render(subject, modality, rng)), subject.affine, np.int16)
    entry = {"case": name, "subject": name, "modalities": list(modalities), "lesion_type": subject.lesion_type}
    entry.update(image=paths, label=f"labelsTr/{name}.nii.gz", lesion_ml=_lesion_summary(label > 0, subject.affine))
    _save(out / entry["label"], label, subject.affine, np.uint8)
    return entry


def _parse_weights(text: str | None) -> Dict[str, float] | None:
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in LESION_TYPES:
            raise argparse.ArgumentTypeError(f"unknown lesion type {name!r}; choose from {', '.join(LESION_TYPES)}.")
        weights[name] = float(value or 1.0)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m scripts.synthetic --out DIR --cases N --seed S``."""
    parser = argparse.ArgumentParser(prog="python -m scripts.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--cases", type=int, required=True, help="subjects (one case per contrast they are imaged in)")
    parser.add_argument("--seed", type=int, required=True, help="dataset seed; use different seeds for held-out sets")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (2: 80x98x80, 1: 160x196x160)")
    parser.add_argument("--modalities", nargs="+", default=None, choices=MODALITIES, help="default: all five")
    parser.add_argument(
        "--lesion-types", type=_parse_weights, default=None, help="e.g. 'glioma=1,wmh=2' (default: all four)"
    )
    parser.add_argument("--native", action="store_true", help="resample each case onto a random scanner grid")
    parser.add_argument(
        "--all-contrasts", action="store_true", help="render every subject in every --modalities contrast"
    )
    parser.add_argument(
        "--multichannel",
        action="store_true",
        help="one case per subject with every --modalities contrast as channel files (MoME+; default channels "
        "t1 t1ce t2 flair)",
    )
    parser.add_argument(
        "--label-scheme",
        choices=("binary", "brats"),
        default="binary",
        help="whole lesion (default) or BraTS sub-regions 1 necrotic core, 2 oedema, 3 enhancing (gliomas only)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.spacing <= 0:
        parser.error("--cases must be >= 1 and --spacing > 0")
    modalities = args.modalities or list(PLUS_MODALITIES if args.multichannel else MODALITIES)
    try:
        path = generate_dataset(
            args.out,
            args.cases,
            args.seed,
            args.spacing,
            modalities,
            args.lesion_types,
            args.native,
            not args.quiet,
            args.all_contrasts,
            args.multichannel,
            args.label_scheme,
        )
    except ValueError as err:
        parser.error(str(err))
    written = len(json.loads(path.read_text())["training"])
    print(f"wrote {written} cases of {args.cases} subjects to {path.parent} ({path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
