"""``make demo``: convert the bundled upstream-format checkpoint set and segment a generated MoME-space image.

Until the trained demo weights land, the only weights that ship with the repository are the authors'-format
checkpoint fixture (``tests/data/upstream_mome_tiny``: the authors' code with *random* weights). The demo therefore
shows the mechanics end to end — conversion to a bundle, MONAI bundle inference with nnU-Net tiling — and its
segmentation has no clinical meaning.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_FIXTURE = REPO / "tests" / "data" / "upstream_mome_tiny"


def make_demo_image(path: Path, shape: tuple[int, int, int] = (64, 64, 64), seed: int = 0) -> Path:
    """A smooth brain-like ellipsoid with a bright round 'lesion', 1 mm voxels, MNI-like origin."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    lesion = ((grid - np.array([0.3, -0.2, 0.1])[:, None, None, None]) ** 2).sum(0) < 0.04
    image = np.where(brain, 400.0, 0.0) + np.where(lesion, 500.0, 0.0) + rng.normal(0, 20, shape) * brain
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-32.0, -32.0, -32.0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    bundle, data, out = args.workdir / "bundle", args.workdir / "input", args.workdir / "output"
    if not (bundle / "models" / "model.pt").is_file():
        print(f"[1/3] converting the upstream-format checkpoints {UPSTREAM_FIXTURE.relative_to(REPO)} -> {bundle}")
        subprocess.run(
            [sys.executable, "-m", "app.cli_convert", str(UPSTREAM_FIXTURE), "--out", str(bundle), "--force"],
            check=True,
        )
    else:
        print(f"[1/3] bundle already converted: {bundle}")
    image = make_demo_image(data / "demo_flair.nii.gz")
    print(f"[2/3] generated a 64^3 MoME-space test image: {image}")
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / "inference.json"),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--bundle_root", str(bundle.resolve()),
        "--dataset_dir", str(data.resolve()),
        "--output_dir", str(out.resolve()),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seg = out / "demo_flair_seg.nii.gz"
    labels = np.asarray(nib.load(seg).dataobj)
    print(f"[3/3] bundle inference took {time.perf_counter() - started:.1f} s")
    print(f"\nSegmentation: {seg}  (shape {labels.shape}, {int((labels > 0).sum())} lesion voxels)")
    print("Note: these are placeholder *random* weights in the authors' checkpoint format; the output only")
    print("demonstrates the pipeline. Convert the authors' released checkpoints with `mome-convert` for real use.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
