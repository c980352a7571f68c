"""Visibility ceiling of the synthetic labels: the best Dice an oracle that sees every visible lesion voxel could reach.

Usage (from the bundle root): ``PYTHONPATH=. python ../bench/visibility_ceiling.py N_SUBJECTS`` (held-out seed 1).
Noise-free rendering of each subject's lesion in the contrasts it is labelled in (generator 1.2).

For every labelled voxel: relative contrast = |lesion signal - signal of the same voxel's healthy tissue| / healthy.
A voxel below 10 % contrast (about 2-3x the noise and texture levels) is called invisible. The Dice of an oracle that
finds every visible voxel and nothing else is 2V/(2V+I) with V visible, I invisible voxels.
"""
import json, sys
import numpy as np
from scripts.synthetic import generate_subject, LESION_CONTRASTS, MODALITIES, COMPARTMENT_SIGNAL, LESION_COMPARTMENTS
from scripts.template import TISSUE_SIGNAL
out = {}
for index in range(int(sys.argv[1])):
    rng = np.random.default_rng([1, index])
    s = generate_subject(rng, 2.0, None)
    label = s.label > 0
    if not label.any():
        continue
    total = s.tissues.sum(0).clip(1e-3)
    for m in LESION_CONTRASTS[s.lesion_type]:
        i = MODALITIES.index(m)
        healthy = (s.tissues * np.array(TISSUE_SIGNAL[m])[:, None, None, None]).sum(0) / total
        image = healthy.copy()
        for name in LESION_COMPARTMENTS[s.lesion_type]:
            a = s.compartments[name]
            image = image * (1 - a) + COMPARTMENT_SIGNAL[name][i] * a
        contrast = np.abs(image - healthy)[label] / np.maximum(healthy[label], 0.05)
        visible = (contrast >= 0.10).sum(); invisible = (contrast < 0.10).sum()
        out.setdefault((m, s.lesion_type), []).append(2 * visible / (2 * visible + invisible))
rows = {f"{m}/{t}": (len(v), round(float(np.mean(v)), 3)) for (m, t), v in sorted(out.items())}
for k, v in rows.items(): print(k, v)
per_mod = {}
for (m, t), v in out.items(): per_mod.setdefault(m, []).extend(v)
print({m: round(float(np.mean(v)), 3) for m, v in per_mod.items()})
