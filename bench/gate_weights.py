"""Is the MoME gate modality-aware? Per case: Dice of the fused output and of each expert alone, and the gate's mean
weight per expert and class inside the brain.

One forward per case on one training-size patch centred on the lesion (the image z-scored as a whole first, as in
inference), the way the training validation sees it: a whole-volume forward would change the networks' instance-norm
statistics and is not what the sliding-window inference runs. Dice values are therefore patch-level diagnostics, not
the held-out metric of ``mome-eval``. A modality-aware gate gives different weights to a T2 and a FLAIR image of the
same subject; an input-independent one prints the same row for every case.

Usage (repository root)::

    python bench/gate_weights.py MODEL.pt [MODEL.pt ...] --data DATA_DIR --cases syn_s1_0003_t2 syn_s1_0003_flair
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))


def _dice(logits: torch.Tensor, truth: np.ndarray) -> float:
    shape = truth.shape
    prediction = (logits[0, 1] > logits[0, 0])[: shape[0], : shape[1], : shape[2]].numpy()
    denominator = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / denominator) if denominator else 1.0


def _lesion_patch(image: np.ndarray, truth: np.ndarray, size: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` patch centred on the lesion's centre of mass (shifted inside the volume; zero-padded if larger)."""
    shape = [max(a, b) for a, b in zip(image.shape, size)]
    padded_image, padded_truth = np.zeros(shape, np.float32), np.zeros(shape, bool)
    padded_image[tuple(slice(0, n) for n in image.shape)] = image
    padded_truth[tuple(slice(0, n) for n in truth.shape)] = truth
    centre = np.argwhere(truth).mean(0) if truth.any() else np.array(shape) / 2
    start = [int(np.clip(round(c - p / 2), 0, n - p)) for c, p, n in zip(centre, size, shape)]
    box = tuple(slice(a, a + p) for a, p in zip(start, size))
    return padded_image[box], padded_truth[box]


def describe(network, data: Path, case: str, modalities: list[str], patch: list[int]) -> str:
    volume = np.asarray(nib.load(data / "imagesTr" / f"{case}_0000.nii.gz").dataobj, np.float32)
    lesion = np.asarray(nib.load(data / "labelsTr" / f"{case}.nii.gz").dataobj) > 0
    image, truth = _lesion_patch(volume, lesion, patch)
    normalised = (image - volume.mean()) / volume.std()
    with torch.inference_mode():
        logits, weights = network._run(torch.from_numpy(np.ascontiguousarray(normalised))[None, None], None, False)
        modality = network.classify(torch.from_numpy(np.ascontiguousarray(normalised))[None, None])
    fused = network.fuse([levels[0] for levels in logits], weights[0])
    k, c = network.num_experts, network.num_classes
    maps = weights[0][0].reshape(k, c, -1)
    brain = torch.from_numpy(image.reshape(-1) != 0)
    mean = maps[:, :, brain].mean(2)  # (K, C)
    experts = " ".join(f"{m} {_dice(levels[0], truth):.2f}" for m, levels in zip(modalities, logits))
    gate = " | ".join(f"class {j}: " + " ".join(f"{v:+.2f}" for v in mean[:, j].tolist()) for j in range(c))
    line = f"{case:<22} fused {_dice(fused, truth):.2f} | experts {experts} | gate mean {gate}"
    if modality is not None:  # the modality classifier's probabilities (our MoME extension)
        line += " | classifier " + " ".join(f"{v:.2f}" for v in torch.softmax(modality[0], 0).tolist())
    return line


def main(argv: list[str] | None = None) -> int:
    from monai.bundle import ConfigParser

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="state dicts of configs/inference.json's network_def")
    parser.add_argument("--data", type=Path, required=True, help="a synthetic (nnU-Net layout) dataset folder")
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--config", type=Path, default=REPO / "bundle" / "configs" / "inference.json")
    args = parser.parse_args(argv)
    config = ConfigParser()
    config.read_config(str(args.config))
    modalities = [str(m) for m in config["modalities"]] if "modalities" in config else []
    for path in args.models:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config["modality_classifier"] = any(key.startswith("classifier.") for key in state)
        network = config.get_parsed_content("network_def", lazy=False)
        network.load_state_dict(state)
        network.eval()
        print(f"== {path}")
        for case in args.cases:
            names = modalities or [str(i) for i in range(network.num_experts)]
            print(describe(network, args.data, case, names, [int(v) for v in config["patch_size"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
