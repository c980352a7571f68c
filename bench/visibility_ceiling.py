"""Visibility ceiling of the synthetic labels: the best Dice an oracle that sees every visible lesion voxel could reach.

For each held-out subject (seed 1) and each contrast its lesion is labelled in (generator 1.2), the noise-free
rendering gives, per labelled voxel, the relative contrast between the lesion signal and that voxel's own healthy
tissue. A voxel under ``--threshold`` (10 %: two to three times the noise and texture levels) counts as invisible;
oracle Dice = 2V / (2V + I) for V visible and I invisible voxels.

Usage (from the bundle root)::

    PYTHONPATH=. python ../bench/visibility_ceiling.py --subjects 24
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from scripts.synthetic import (
    COMPARTMENT_SIGNAL,
    LESION_COMPARTMENTS,
    LESION_CONTRASTS,
    MODALITIES,
    Subject,
    generate_subject,
)
from scripts.template import TISSUE_SIGNAL


def oracle_dice(subject: Subject, modality: str, threshold: float) -> float:
    """Dice of an oracle that finds exactly the label voxels whose contrast reaches ``threshold``."""
    index = MODALITIES.index(modality)
    total = subject.tissues.sum(0).clip(1e-3)
    healthy = (subject.tissues * np.array(TISSUE_SIGNAL[modality])[:, None, None, None]).sum(0) / total
    image = healthy.copy()
    for name in LESION_COMPARTMENTS[subject.lesion_type]:
        membership = subject.compartments[name]
        image = image * (1 - membership) + COMPARTMENT_SIGNAL[name][index] * membership
    label = subject.label > 0
    contrast = np.abs(image - healthy)[label] / np.maximum(healthy[label], 0.05)
    visible, invisible = int((contrast >= threshold).sum()), int((contrast < threshold).sum())
    return 2 * visible / (2 * visible + invisible)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.10)
    args = parser.parse_args()
    by_type, by_modality = defaultdict(list), defaultdict(list)
    for index in range(args.subjects):
        subject = generate_subject(np.random.default_rng([args.seed, index]), 2.0, None)
        if not subject.label.any():
            continue
        for modality in LESION_CONTRASTS[subject.lesion_type]:
            dice = oracle_dice(subject, modality, args.threshold)
            by_type[(modality, subject.lesion_type)].append(dice)
            by_modality[modality].append(dice)
    for (modality, lesion_type), values in sorted(by_type.items()):
        print(f"{modality:6s} {lesion_type:15s} n={len(values):2d} oracle Dice {np.mean(values):.3f}")
    print({modality: round(float(np.mean(values)), 3) for modality, values in by_modality.items()})


if __name__ == "__main__":
    main()
