"""``make demo``: segment an unseen synthetic subject in all five contrasts with the bundle's demo model.

The demo model (``bundle/models/model.pt``) is a small MoME trained on synthetic data on a CPU (see
``bundle/docs/README.md``). The demo generates a subject the model has never seen (its own seed), renders it as T1,
T1ce, T2, FLAIR and DWI, runs the bundle with ``python -m monai.bundle run`` exactly as a user would, and scores
each output against the known lesion. The same model, without being told the modality, segments all five.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from app.bundle_path import default_bundle_dir, use_bundle_scripts

DEMO_SEED = 2024  # not a training (0) or benchmark test (1) seed


def generate_subject(bundle: Path, out: Path, seed: int = DEMO_SEED) -> list[dict]:
    """One synthetic subject in the five MoME contrasts (MoME space, 2 mm) with its ground truth."""
    use_bundle_scripts(bundle)
    from scripts.synthetic import generate_dataset

    dataset = generate_dataset(out, cases=1, seed=seed, spacing=2.0)
    return json.loads(dataset.read_text())["training"]


def run_bundle(bundle: Path, images: Path, output: Path) -> None:
    """``python -m monai.bundle run`` with the bundle's own inference config."""
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / "inference.json"),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--bundle_root", str(bundle),
        "--dataset_dir", str(images),
        "--output_dir", str(output),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--model", type=Path, default=None, help="bundle folder (default: the repository's bundle)")
    args = parser.parse_args(argv)
    bundle = (args.model or default_bundle_dir()).resolve()
    if not (bundle / "models" / "model.pt").is_file():
        print(f"{bundle}: no models/model.pt; convert or train a model first.", file=sys.stderr)
        return 3
    data, output = args.workdir.resolve() / "input", args.workdir.resolve() / "output"
    cases = generate_subject(bundle, data)
    print(f"[1/3] generated an unseen synthetic subject ({cases[0]['lesion_type']}), 5 contrasts: {data / 'imagesTr'}")
    started = time.perf_counter()
    run_bundle(bundle, data / "imagesTr", output)
    print(f"[2/3] MoME inference on 5 volumes (80x98x80): {time.perf_counter() - started:.0f} s -> {output}")
    from scripts.metrics import lesion_metrics

    print("[3/3] agreement with the known lesion:\n")
    print(f"  {'modality':<9}{'Dice':>6}{'true mL':>10}{'predicted mL':>14}   segmentation")
    for case in cases:
        seg_path = output / (Path(case["image"]).name.replace(".nii.gz", "") + "_seg.nii.gz")
        truth = nib.load(data / case["label"])
        prediction = np.asarray(nib.load(seg_path).dataobj)
        voxel_ml = float(np.prod(truth.header.get_zooms()[:3])) / 1000.0
        scores = lesion_metrics(prediction, np.asarray(truth.dataobj), voxel_ml)
        print(
            f"  {case['modality']:<9}{scores['dice']:>6.3f}{scores['volume_true_ml']:>10.1f}"
            f"{scores['volume_pred_ml']:>14.1f}   {os.path.relpath(seg_path)}"
        )
    print("\nThe demo model was trained on synthetic data only: it is not for clinical use or real measurements.")
    print("Use the authors' weights (`mome-convert`) or train on your own data (bundle/docs/README.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
