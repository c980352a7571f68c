"""Error analysis of the benchmark: rebuilt synthetic subjects and false positives classified by tissue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bench_modules import load_bench

from app.evaluation import prediction_path
from scripts.synthetic import GENERATOR_VERSION, generate_dataset, regenerate_subject

errors = load_bench("errors_by_tissue")
mome_vs_unet = load_bench("mome_vs_unet")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, cases=1, seed=7, modalities=("t2",), lesion_weights={"glioma": 1.0})
    return out


def _entry(dataset: Path) -> dict:
    return json.loads((dataset / "dataset.json").read_text())["training"][0]


def _write_prediction(dataset: Path, predictions: Path, mask: np.ndarray) -> None:
    entry = _entry(dataset)
    label = nib.load(dataset / entry["label"])
    predictions.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), label.affine), prediction_path(predictions, Path(entry["image"])))


def _truth(dataset: Path) -> np.ndarray:
    return np.asanyarray(nib.load(dataset / _entry(dataset)["label"]).dataobj) > 0


def test_rebuilt_subject_has_the_stored_label(dataset):
    generator = json.loads((dataset / "dataset.json").read_text())["generator"]
    subject = regenerate_subject(generator, _entry(dataset)["subject"])
    assert subject.label.any()
    np.testing.assert_array_equal(subject.label > 0, _truth(dataset))


def test_rebuild_refuses_other_versions_spaces_and_seeds():
    record = {"version": GENERATOR_VERSION, "space": "mome", "seed": 7, "spacing_mm": 2.0}
    with pytest.raises(ValueError, match="version"):
        regenerate_subject({**record, "version": "0.1"}, "syn_s7_0000")
    with pytest.raises(ValueError, match="native"):
        regenerate_subject({**record, "space": "native"}, "syn_s7_0000")
    with pytest.raises(ValueError, match="seed 7"):
        regenerate_subject(record, "syn_s8_0000")


def test_perfect_prediction_has_no_false_positives(dataset, tmp_path):
    truth = _truth(dataset)
    _write_prediction(dataset, tmp_path / "pred", truth)
    case = errors.analyse(dataset, tmp_path / "pred")["per_case"][0]
    voxel_ml = 0.008  # 2 mm isotropic
    assert case["tp_ml"] == pytest.approx(truth.sum() * voxel_ml)
    assert case["fn_ml"] == 0.0
    assert sum(case["fp_ml"].values()) == 0.0


def test_false_positives_are_classified_by_tissue_and_distance(dataset, tmp_path):
    truth = _truth(dataset)
    generator = json.loads((dataset / "dataset.json").read_text())["generator"]
    subject = regenerate_subject(generator, _entry(dataset)["subject"])
    classes = errors.error_classes(subject, truth)
    csf_far = (classes == errors.CLASSES.index("csf")) & (subject.brain > 0)
    assert csf_far.sum() > 100
    shell = (classes == errors.CLASSES.index("border")) & ~truth
    _write_prediction(dataset, tmp_path / "pred", csf_far | shell)
    result = errors.analyse(dataset, tmp_path / "pred")
    case = result["per_case"][0]
    assert case["tp_ml"] == 0.0
    assert case["fp_ml"]["csf"] == pytest.approx(csf_far.sum() * 0.008)
    assert case["fp_ml"]["border"] == pytest.approx(shell.sum() * 0.008)
    assert case["fp_ml"]["gm"] == case["fp_ml"]["wm"] == case["fp_ml"]["outside"] == 0.0
    assert shell.sum() > 0
    assert result["per_modality"]["t2"]["n"] == 1


def test_a_label_that_is_not_the_rebuilt_subjects_is_refused(dataset, tmp_path):
    tmp_path = Path(shutil.copytree(dataset, tmp_path / "copy"))
    entry = _entry(tmp_path)
    label = nib.load(tmp_path / entry["label"])
    tampered = np.asanyarray(label.dataobj).copy()
    tampered[tuple(np.argwhere(tampered == 0)[0])] = 1
    nib.save(nib.Nifti1Image(tampered, label.affine), tmp_path / entry["label"])
    _write_prediction(tmp_path, tmp_path / "pred", tampered > 0)
    with pytest.raises(ValueError, match="differs"):
        errors.analyse(tmp_path, tmp_path / "pred")


def test_benchmark_report_tables_both_models_errors(dataset, tmp_path):
    truth = _truth(dataset)
    _write_prediction(dataset, tmp_path / "perfect", truth)
    _write_prediction(dataset, tmp_path / "empty", np.zeros_like(truth))
    summary = mome_vs_unet.tissue_errors(
        {
            "mome": [(dataset, {"predictions": str(tmp_path / "perfect")})],
            "unet": [(dataset, {"predictions": str(tmp_path / "empty")})],
        }
    )
    assert summary["mome"]["t2"]["fn_ml"] == 0.0
    assert summary["unet"]["t2"]["tp_ml"] == 0.0
    assert summary["unet"]["t2"]["fn_ml"] == pytest.approx(truth.sum() * 0.008)
    split = {"mome": {"t2": {"n": 1, "dice": 1.0}}, "unet": {"t2": {"n": 1, "dice": 0.0}}}
    report = {"machine": "m", "training": "t", "splits": {"seed7": split}, "errors_by_tissue": summary}
    markdown = mome_vs_unet.summary_markdown(report)
    assert "| seed7 | t2 | 1 | 1.000 | 0.000 | +1.000 |" in markdown
    volume = f"{truth.sum() * 0.008:.2f}"
    assert f"| mome | t2 | 1 | {volume} | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |" in markdown
    assert f"| unet | t2 | 1 | 0.00 | {volume} | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |" in markdown
