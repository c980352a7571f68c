"""The bundle as MONAI tooling sees it: properties, CLI run, net in/out, TorchScript export, offline metadata check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import create_workflow

from scripts.inferers import NNUNetSlidingWindowInferer

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "bundle"


def monai_bundle(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=bundle, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("which", ["template", "converted"])
def test_inference_workflow_properties(which, converted_bundle):
    bundle = TEMPLATE if which == "template" else converted_bundle
    workflow = create_workflow(
        workflow_type="inference",
        config_file=str(bundle / "configs/inference.json"),
        meta_file=str(bundle / "configs/metadata.json"),
        bundle_root=str(bundle),
    )
    assert workflow.check_properties() == []


@pytest.mark.parametrize("which", ["template", "converted"])
def test_verify_metadata_offline(which, converted_bundle):
    bundle = TEMPLATE if which == "template" else converted_bundle
    result = monai_bundle(
        bundle, "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "docs/meta_schema.json"
    )
    assert result.returncode == 0 and "metadata is verified with no error" in result.stderr + result.stdout


@pytest.mark.parametrize("which", ["converted", pytest.param("template", marks=pytest.mark.slow)])
def test_verify_net_in_out(which, converted_bundle):
    bundle = TEMPLATE if which == "template" else converted_bundle
    result = monai_bundle(
        bundle,
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified with no error" in result.stderr + result.stdout


def test_torchscript_export_matches_eager(converted_bundle, converted_network, reference_outputs):
    scripted = torch.jit.load(str(converted_bundle / "models/model.ts"))
    x = reference_outputs["tile_input"]
    with torch.no_grad():
        experts, weights = converted_network._run(x, None, False)
        concatenated = converted_network.fuse([levels[0] for levels in experts], weights[0])
        torch.testing.assert_close(scripted(x), concatenated)
        # eager eval accumulates the gate's first convolution per expert (memory-lean): same sums, other order
        torch.testing.assert_close(scripted(x), converted_network(x), rtol=1e-4, atol=5e-4)


def test_bundle_run_on_a_nifti(tmp_path, converted_bundle, converted_network):
    """`monai.bundle run` writes a uint8 label map on the input grid that equals network + inferer + argmax on the
    (z, y, x) array, i.e. the axis convention of the authors' SimpleITK pipeline is respected end to end."""
    data, out = tmp_path / "data", tmp_path / "eval"
    data.mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(100, 30, size=(36, 40, 34)).astype(np.float32)
    image[10:20, 12:30, 8:16] += 150
    affine = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), data / "case_flair.nii.gz")
    result = monai_bundle(
        converted_bundle,
        "run",
        "--config_file",
        "configs/inference.json",
        "--meta_file",
        "configs/metadata.json",
        "--bundle_root",
        str(converted_bundle),
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--cpu_bf16",
        "False",  # float32 on every CPU, so the labels can be compared with the float32 reference below
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seg = nib.load(out / "case_flair_seg.nii.gz")
    assert seg.shape == image.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, affine)

    zyx = torch.from_numpy(image.transpose(2, 1, 0).copy())
    zyx = (zyx - zyx.mean()) / zyx.std(unbiased=False)
    with torch.no_grad():
        logits = NNUNetSlidingWindowInferer((32, 32, 32))(zyx[None, None], converted_network)[0]
    expected = logits.argmax(0).numpy().transpose(2, 1, 0)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1}
    assert (labels == expected).mean() >= 0.9999


ARCHITECTURE_IDS = ("modalities", "num_classes", "in_channels", "features_per_stage", "kernel_sizes", "strides")
ARCHITECTURE_IDS += ("n_conv_per_stage", "n_conv_per_stage_decoder", "spacing", "normalize_nonzero")


def test_train_configs_share_the_inference_architecture():
    configs = {n: json.loads((TEMPLATE / "configs" / f"{n}.json").read_text()) for n in ("inference", "train")}
    configs["train_expert"] = json.loads((TEMPLATE / "configs/train_expert.json").read_text())
    for key in ARCHITECTURE_IDS:
        assert configs["train"][key] == configs["inference"][key] == configs["train_expert"][key], key
    # the demo infers on tiles larger than its training patch (bundle docs, Demo model), both multiples of the divisor
    assert configs["train"]["patch_size"] == configs["train_expert"]["patch_size"]
    divisor = np.prod(configs["inference"]["strides"], axis=0)
    for name in ("inference", "train"):
        assert all(p % d == 0 for p, d in zip(configs[name]["patch_size"], divisor)), name
    assert all(i >= t for i, t in zip(configs["inference"]["patch_size"], configs["train"]["patch_size"]))
