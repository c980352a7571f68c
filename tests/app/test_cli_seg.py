"""`mome-seg` on native-space NIfTI: outputs on the input grid, report, --save-mni, rejections; pipeline geometry."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app.cli import seg_main
from app.nifti_io import guess_modality

REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
REAL_HEAD = REPO / "tests" / "data" / "real_brains" / "KmeansTest_T1UCharRaw.nii.gz"


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_segments_a_real_head_on_its_own_grid(tmp_path, tiny_bundle):
    source = tmp_path / "in" / "head_t1.nii.gz"
    source.parent.mkdir()
    shutil.copy(REAL_HEAD, source)
    out = tmp_path / "out"
    assert seg_main([str(source), "-o", str(out), "--model", str(tiny_bundle), "--save-mni", "--quiet"]) == 0
    image, seg = nib.load(source), nib.load(out / "head_t1_seg.nii.gz")
    assert seg.shape == image.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    report = json.loads((out / "report.json").read_text())
    assert report["modality"] == "t1" and report["modality_source"] == "file name"
    voxels = int((np.asarray(seg.dataobj) > 0).sum())
    assert report["lesion_volume_ml"] == pytest.approx(voxels * 12 / 1000, abs=1e-3)  # 2 x 2 x 3 mm voxels
    assert report["lesion_count"] >= (1 if voxels else 0) and report["largest_lesion_ml"] <= report["lesion_volume_ml"]
    registration = report["registration"]
    assert registration["template_contrast"] == "t1" and registration["nmi"] > 1.01 and report["warnings"] == []
    assert np.array(registration["template_to_native"]).shape == (4, 4)
    assert set(report["seconds"]) >= {"registration", "network", "to_native", "total"}
    assert report["inference"]["profile"] == "fast" and report["inference"]["n_tiles"] >= 1
    assert report["model"]["version"] and report["model"]["spacing_mm"] == 4.0
    mni = nib.load(out / "head_t1_mni.nii.gz")
    assert mni.shape == (40, 49, 40) and nib.load(out / "head_t1_mni_seg.nii.gz").shape == (40, 49, 40)
    assert sorted(p.name for p in out.iterdir()) == [
        ".mome-manifest.json", "head_t1_mni.nii.gz", "head_t1_mni_seg.nii.gz", "head_t1_qc.png", "head_t1_seg.nii.gz",
        "report.json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: nib.Nifti1Image(np.ones((64, 64), np.float32), np.eye(4)), "3-D"),
        (lambda: nib.Nifti1Image(np.ones((64, 64, 40), np.float32), np.diag([2, 2, 3, 1.0])), "constant"),
        (lambda: nib.Nifti1Image(RNG.random((64, 64, 40), np.float32), np.diag([0.5, 0.5, 0.5, 1])), "view"),
    ],
)
def test_rejected_inputs_exit_3_and_write_nothing(tmp_path, tiny_bundle, capsys, make, reason):
    source = tmp_path / "scan.nii.gz"
    nib.save(make(), source)
    out = tmp_path / "out"
    assert seg_main([str(source), "-o", str(out), "--model", str(tiny_bundle), "--quiet"]) == 3
    message = capsys.readouterr().err
    assert "scan.nii.gz" in message and reason in message
    assert not out.exists() or not any(out.iterdir())


def test_usage_errors_exit_2(tmp_path, tiny_bundle):
    assert seg_main([]) == 2
    assert seg_main([str(tmp_path / "x.nii.gz"), "-o", str(tmp_path), "--modality", "ct"]) == 2
    assert seg_main([str(REAL_HEAD), "-o", str(tmp_path), "--model", str(tmp_path / "nowhere")]) == 2
    not_nifti = tmp_path / "scan.dcm"
    not_nifti.write_bytes(b"DICM")
    assert seg_main([str(not_nifti), "-o", str(tmp_path / "o"), "--model", str(tiny_bundle)]) == 3


def test_the_bundle_is_found_from_its_own_flag_only(tiny_bundle):
    """``--mode plus`` after ``--model`` must not be read as an abbreviated ``--model``."""
    from app.cli.options import bundle_from_argv

    resolved = tiny_bundle.resolve()
    assert bundle_from_argv(["in", "--model", str(tiny_bundle), "--mode", "plus"]) == resolved
    assert bundle_from_argv(["-i", "in", "-m", str(tiny_bundle), "--mode", "single"], ("-m", "--model")) == resolved


def test_without_any_bundle_the_commands_exit_2_naming_it(tmp_path):
    """No installed bundle ($MOME_BUNDLE names a missing folder): a usage error, not a traceback while parsing."""
    import os
    import subprocess

    missing = tmp_path / "no_bundle"
    env = {**os.environ, "MOME_BUNDLE": str(missing), "PYTHONPATH": str(REPO)}
    for command in ("seg_main", "eval_main"):
        code = f"import sys; from app.cli import {command}; sys.exit({command}(sys.argv[1:]))"
        args = [str(REAL_HEAD), "-o", str(tmp_path / "out")]
        if command == "eval_main":
            args = ["--data", str(tmp_path), "--model", str(missing)]
        command_line = [sys.executable, "-c", code, *args]
        result = subprocess.run(command_line, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr[-2000:]
        assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_modality_from_file_name():
    assert guess_modality(Path("sub-01_FLAIR.nii.gz")) == "flair"
    assert guess_modality(Path("case_t1ce_0000.nii.gz")) == "t1ce"
    assert guess_modality(Path("brain.nii")) is None


class _BrightnessOracle(torch.nn.Module):
    """Stands in for a trained MoME: calls 'lesion' where the z-scored input is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 4.0 * (x - 3.0)], dim=1)


def test_pipeline_puts_lesions_where_they_are_on_an_oblique_native_grid(tmp_path, tiny_bundle):
    """A synthetic DWI stroke on a random oblique, thick-slice grid: registration, MoME space and back.

    With a network that thresholds brightness, the native output must match the native ground truth: a flipped axis,
    a wrong transform direction or a half-voxel shift would break it.
    """
    from scripts.pipeline import MoMESegmenter
    from scripts.synthetic import generate_dataset

    dataset = json.loads(
        generate_dataset(
            tmp_path, 1, seed=3, spacing=2.0, modalities=["dwi"], lesion_weights={"stroke_acute": 1.0}, native=True
        ).read_text()
    )
    entry = dataset["training"][0]
    image = nib.load(tmp_path / entry["image"])
    truth = np.asarray(nib.load(tmp_path / entry["label"]).dataobj) > 0
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    segmenter.network = _BrightnessOracle()
    result = segmenter.segment(np.asarray(image.dataobj, np.float32), image.affine, modality="dwi")
    predicted = result.labels > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert result.labels.shape == truth.shape and dice >= 0.7, dice
    assert result.registration.template_contrast == "dwi"


def test_bundle_native_config_runs_native_nifti(tmp_path, tiny_bundle):
    """`monai.bundle run` with inference.json + inference_native.json: outputs land on each input's own grid."""
    import os
    import subprocess

    from scripts.synthetic import generate_dataset

    dataset = json.loads(generate_dataset(tmp_path / "data", 1, seed=4, spacing=2.0, native=True).read_text())
    inputs = tmp_path / "in"
    inputs.mkdir()
    for entry in dataset["training"][:2]:
        shutil.copy(tmp_path / "data" / entry["image"], inputs / Path(entry["image"]).name)
    configs = "['configs/inference.json','configs/inference_native.json']"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", "."]
    command += ["--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out"), "--device", "$torch.device('cpu')"]
    env = {**os.environ, "PYTHONPATH": str(tiny_bundle)}
    result = subprocess.run(command, cwd=tiny_bundle, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for source in sorted(inputs.iterdir()):
        seg = nib.load(tmp_path / "out" / source.name.replace("_0000.nii.gz", "_0000_seg.nii.gz"))
        image = nib.load(source)
        assert seg.shape == image.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)


def test_profile_option_reaches_the_inferer_and_the_report(tiny_bundle, tmp_path):
    from app.cli.application import build_parser as app_parser
    from app.cli.seg import build_parser
    from operators.bundle import profile_names
    from scripts.pipeline import MoMESegmenter
    from scripts.profiles import PROFILES

    assert sorted(profile_names()) == sorted(PROFILES)
    assert MoMESegmenter(tiny_bundle).inferer.describe()["profile"] == "fast"  # the bundle's default
    parity = MoMESegmenter(tiny_bundle, profile="parity")
    assert parity.inferer.describe()["profile"] == "parity"
    mome_space = np.random.default_rng(0).normal(size=(40, 49, 40)).astype(np.float32)
    parity.probabilities(mome_space)
    record = parity.inference_record()
    assert record["n_tiles"] == 2 * 3 * 2 and record["tile_size"] == [32, 32, 32] and record["device"] == "cpu"
    assert record["precision"] == "float32" and record["threads"] >= 1
    assert build_parser().parse_args(["x.nii.gz", "-o", "out", "--profile", "accurate"]).profile == "accurate"
    assert app_parser().parse_known_args(["--profile", "parity"])[0].profile == "parity"
    assert seg_main([str(REAL_HEAD), "-o", str(tmp_path / "out"), "--profile", "quick"]) == 2
    assert not (tmp_path / "out").exists()


def test_nifti_offsets_keep_their_precision(tmp_path):
    """A NIfTI stored as int32 near -2**31 (a large negative offset) reads as the plain image, shifted to start at 0;
    a float32 read of those values would have rounded them to multiples of 128-256."""
    from app.nifti_io import load_volume

    rng = np.random.default_rng(0)
    plain = rng.integers(0, 3000, (20, 20, 12)).astype(np.int64)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(plain.astype(np.int16), affine), tmp_path / "plain.nii.gz")
    nib.save(nib.Nifti1Image((plain - 2**31 + 7000).astype(np.int32), affine), tmp_path / "wide.nii.gz")
    expected, _, _ = load_volume(tmp_path / "plain.nii.gz")
    array, _, _ = load_volume(tmp_path / "wide.nii.gz")
    np.testing.assert_array_equal(array, expected)
    assert array.min() == 0 and array.dtype == np.float32
    old_read = np.asarray(nib.load(tmp_path / "wide.nii.gz").dataobj, dtype=np.float32)
    assert np.abs((old_read - old_read.min()) - expected).max() > 0  # what 0.9.1 read


def test_a_nifti_declaring_a_huge_volume_is_rejected_before_its_data_are_read(tmp_path, monkeypatch, capsys):
    """A tiny .nii whose header declares 12000 x 12000 x 12000 voxels: exit 3 naming the limit, nothing allocated."""
    header = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).header
    header.set_data_shape((12000, 12000, 12000))
    header["vox_offset"] = 352
    nii = tmp_path / "huge_flair.nii"
    nii.write_bytes(header.binaryblock + bytes(4 + 64))  # the extension flag and a few voxels
    assert seg_main([str(nii), "-o", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "max_matrix" in err and "MOME_MAX_MATRIX" in err and not (tmp_path / "out").exists()
    monkeypatch.setenv("MOME_MAX_MATRIX", "many")
    assert seg_main([str(nii), "-o", str(tmp_path / "out")]) == 2
