"""`mome-eval` end to end on a tiny labelled dataset: bundle inference, --predictions mode and the rejections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.cli import eval_main
from app.evaluation import discover_cases, modality_of
from scripts.metrics import lesion_metrics

REPO = Path(__file__).resolve().parents[2]
SHAPE = (32, 40, 36)
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])  # 1.5 uL voxels
CASES = {"syn_s0_0000_flair": "glioma", "syn_s0_0001_t1": "stroke"}


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """eval_main and MONAI's workflow put the bundle on sys.path; keep that local to each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def box_label(offset: int) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[8 + offset : 16 + offset, 10:20, 12:18] = 1  # 8 * 10 * 6 = 480 voxels
    return label


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two cases in the synthetic generator's layout (dataset.json + imagesTr/labelsTr)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    training = []
    for index, (case, lesion_type) in enumerate(CASES.items()):
        label = box_label(index * 4)
        image = rng.normal(100, 20, size=SHAPE).astype(np.float32) + 120 * label
        save(root / "imagesTr" / f"{case}_0000.nii.gz", image)
        save(root / "labelsTr" / f"{case}.nii.gz", label)
        subject, modality = case.rsplit("_", 1)
        training.append(
            {
                "case": case,
                "subject": subject,
                "modality": modality,
                "lesion_type": lesion_type,
                "image": f"imagesTr/{case}_0000.nii.gz",
                "label": f"labelsTr/{case}.nii.gz",
            }
        )
    meta = {"name": "MoMESynthetic", "labels": {"background": 0, "lesion": 1}, "numTraining": 2}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


def hand_predictions(dataset: Path, folder: Path) -> dict[str, float]:
    """Prediction 0 = its label (Dice 1); prediction 1 = its label box shifted by 2 voxels (Dice 6/8)."""
    expected = {}
    for index, case in enumerate(CASES):
        label = np.asarray(nib.load(dataset / "labelsTr" / f"{case}.nii.gz").dataobj)
        prediction = label if index == 0 else np.roll(label, 2, axis=0)
        save(folder / f"{case}_0000_seg.nii.gz", prediction.astype(np.uint8))
        expected[case] = 1.0 if index == 0 else 2 * 360 / (480 + 480)
    return expected


def test_bundle_inference_results(dataset, converted_bundle, tmp_path, capsys):
    out = tmp_path / "report" / "results.json"
    args = ["--data", str(dataset), "--model", str(converted_bundle), "--out", str(out), "--device", "cpu"]
    assert eval_main([*args, "--profile", "parity"]) == 0
    results = json.loads(out.read_text())
    assert results["model"]["profile"] == "parity"

    meta = json.loads((converted_bundle / "configs" / "metadata.json").read_text())
    assert results["model"]["name"] == meta["name"] and results["model"]["version"] == meta["version"]
    assert results["data"] == str(dataset.resolve())
    assert [c["case"] for c in results["per_case"]] == list(CASES)
    assert [c["modality"] for c in results["per_case"]] == ["flair", "t1"]
    assert [c["lesion_type"] for c in results["per_case"]] == list(CASES.values())
    assert set(results["per_modality"]) == {"flair", "t1"}
    assert results["overall"]["n"] == 2 and results["overall"]["mean_of_group_means"]["n_groups"] == 2

    predictions = tmp_path / "report" / "results_predictions"
    assert results["predictions"] == str(predictions.resolve())
    for record in results["per_case"]:
        assert record["image"] == f"imagesTr/{record['case']}_0000.nii.gz"
        seg = nib.load(predictions / f"{record['case']}_0000_seg.nii.gz")
        assert seg.shape == SHAPE
        label = np.asarray(nib.load(dataset / "labelsTr" / f"{record['case']}.nii.gz").dataobj)
        expected = lesion_metrics(np.asarray(seg.dataobj), label, 1.5e-3)
        assert {key: record[key] for key in expected} == pytest.approx(expected)
    mean_dice = np.mean([c["dice"] for c in results["per_case"]])
    assert results["overall"]["dice"] == pytest.approx(mean_dice)

    table = capsys.readouterr().out
    assert "flair" in table and "t1" in table and "overall" in table


def test_predictions_mode_gives_known_dice(dataset, converted_bundle, tmp_path, capsys):
    predictions = tmp_path / "preds"
    expected = hand_predictions(dataset, predictions)
    out = tmp_path / "results.json"
    args = ["--data", str(dataset), "--model", str(converted_bundle), "--predictions", str(predictions)]
    assert eval_main([*args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {c["case"]: c["dice"] for c in results["per_case"]} == pytest.approx(expected)
    t1 = results["per_case"][1]
    assert t1["volume_true_ml"] == pytest.approx(480 * 1.5e-3) and t1["volume_error_ml"] == pytest.approx(0.0)
    assert t1["n_lesions_true"] == t1["n_lesions_pred"] == 1 and t1["lesion_f1"] == 1.0
    assert results["per_modality"]["t1"]["dice"] == pytest.approx(0.75)
    assert results["per_lesion_type"]["glioma"]["dice"] == pytest.approx(1.0)
    assert results["predictions"] == str(predictions.resolve())
    assert not (tmp_path / "results_predictions").exists()

    capsys.readouterr()
    assert eval_main([*args, "--cases", "syn_s0_0001_t1"]) == 0
    table = capsys.readouterr().out
    assert "flair" not in table and "0.7500" in table


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_geometry_mismatch_is_rejected(mismatch, dataset, converted_bundle, tmp_path, capsys):
    predictions = tmp_path / "preds"
    hand_predictions(dataset, predictions)
    bad = predictions / "syn_s0_0001_t1_0000_seg.nii.gz"
    if mismatch == "shape":
        save(bad, np.zeros((32, 40, 35), dtype=np.uint8))
    else:
        save(bad, box_label(4), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    out = tmp_path / "results.json"
    args = ["--data", str(dataset), "--model", str(converted_bundle), "--predictions", str(predictions)]
    assert eval_main([*args, "--out", str(out)]) == 3
    message = capsys.readouterr().err
    assert str(bad) in message and mismatch in message
    assert not out.exists()


def test_missing_label_is_rejected_before_inference(dataset, converted_bundle, tmp_path, capsys):
    label = dataset / "labelsTr" / "syn_s0_0000_flair.nii.gz"
    label.unlink()
    out = tmp_path / "results.json"
    assert eval_main(["--data", str(dataset), "--model", str(converted_bundle), "--out", str(out)]) == 3
    message = capsys.readouterr().err
    assert str(label) in message and "not found" in message
    assert not out.exists()


def test_missing_prediction_and_unknown_case_are_rejected(dataset, converted_bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--data", str(dataset), "--model", str(converted_bundle), "--predictions", str(empty)]
    assert eval_main(args) == 3
    assert "syn_s0_0000_flair_0000_seg.nii.gz" in capsys.readouterr().err
    assert eval_main([*args, "--cases", "nope"]) == 3
    assert "nope" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, converted_bundle, capsys):
    assert eval_main(["--data", str(tmp_path / "missing"), "--model", str(converted_bundle)]) == 2
    assert "--data" in capsys.readouterr().err
    assert eval_main(["--data", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert eval_main(["--data", str(tmp_path)]) == 2


def test_python_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "app.cli_eval", "--data", str(tmp_path / "missing"), "--model", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "no such folder" in result.stderr


def test_folder_discovery_without_dataset_json(tmp_path):
    for case in ("sub1_FLAIR", "sub2_t1ce", "sub3_other"):
        save(tmp_path / "imagesTs" / f"{case}_0000.nii.gz", np.zeros((4, 4, 4), dtype=np.float32))
    cases = discover_cases(tmp_path)
    assert [(c.case, c.modality) for c in cases] == [
        ("sub1_FLAIR", "flair"),
        ("sub2_t1ce", "t1ce"),
        ("sub3_other", "unknown"),
    ]
    assert cases[0].label == tmp_path / "labelsTs" / "sub1_FLAIR.nii.gz"
    assert modality_of("x_t1ce_extra") == "unknown" and modality_of("x_t2") == "t2"


def _tiny_plus_bundle(tmp_path: Path) -> Path:
    import shutil

    import torch

    from scripts.networks import MoMEPlus

    bundle = tmp_path / "bundle_plus"
    shutil.copytree(REPO / "bundle", bundle, ignore=shutil.ignore_patterns("models", "training", "data", "__pycache__"))
    path = bundle / "configs" / "inference_plus.json"
    config = {**json.loads(path.read_text()), "features_per_stage": [2, 4, 8, 16], "patch_size": [16, 16, 16]}
    path.write_text(json.dumps(config, indent=1))
    keys = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder")
    torch.manual_seed(0)
    (bundle / "models").mkdir()
    torch.save(MoMEPlus(4, 4, **{k: config[k] for k in keys}).state_dict(), bundle / "models" / "model_plus.pt")
    return bundle


def test_mome_plus_dataset_is_evaluated_per_availability_pattern(tmp_path, capsys, converted_bundle):
    from scripts.synthetic import generate_dataset

    data = tmp_path / "plus"
    generate_dataset(data, 2, seed=3, spacing=4.0, modalities=["t1", "t1ce", "t2", "flair"],
                     lesion_weights={"glioma": 1.0}, multichannel=True, label_scheme="brats")  # fmt: skip
    bundle = _tiny_plus_bundle(tmp_path)
    out = tmp_path / "results.json"
    args = ["--data", str(data), "--model", str(bundle), "--out", str(out), "--patterns", "t1ce+flair", "flair"]
    assert eval_main(args) == 0
    results = json.loads(out.read_text())
    assert list(results["per_pattern"]) == ["t1ce+flair", "flair"] and results["modalities"] == ["t1", "t1ce", "t2",
                                                                                                  "flair"]  # fmt: skip
    assert all(group["n"] == 2 for group in results["per_pattern"].values())
    assert {"dice_whole_tumour", "dice_tumour_core", "dice_enhancing_tumour"} <= set(results["per_case"][0])
    assert len(list(Path(results["predictions"]).glob("*__t1ce+flair_seg.nii.gz"))) == 2
    assert "BraTS regions" in capsys.readouterr().out
    assert eval_main(["--data", str(data), "--model", str(bundle), "--patterns", "flair+t1"]) == 3
    assert "not subsets" in capsys.readouterr().err
    assert eval_main(["--data", str(data), "--model", str(converted_bundle)]) == 3
    assert "no MoME+ model" in capsys.readouterr().err
