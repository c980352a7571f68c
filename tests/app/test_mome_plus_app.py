"""MoME+ in the DICOM application: grouping of a study's T1/T1ce/T2/FLAIR series, co-registration, one SEG with the
tumour sub-regions on the reference series that references every contributing series, the report, and --mode."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from dicom_factory import DCIODVFY, dciodvfy_errors
from pydicom.uid import generate_uid

from app.demo_study import DEMO_SERIES, save_series, series_datasets

REPO = Path(__file__).resolve().parents[2]
TINY = {"features_per_stage": [2, 4, 8, 16], "patch_size": [32, 32, 32], "spacing": [4.0, 4.0, 4.0]}


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


def _rigid(degrees: float, shift: tuple[float, float, float]) -> np.ndarray:
    angle = np.deg2rad(degrees)
    matrix = np.eye(4)
    matrix[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    matrix[:3, 3] = shift
    return matrix


@pytest.fixture(scope="module")
def plus_study(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One glioma subject: T1ce and T2 in one frame of reference (T1ce on a finer grid), FLAIR from another session
    (own frame of reference, head moved rigidly), and a DWI series; returns the folder and the series UIDs."""
    from scripts.synthetic import generate_subject, render

    rng = np.random.default_rng([11, 0])
    subject = generate_subject(rng, 2.0, {"glioma": 1.0})
    study_uid, session = generate_uid(), generate_uid()
    root = tmp_path_factory.mktemp("plus") / "dicom"
    volumes = {m: render(subject, m, rng) for m in ("t1ce", "t2", "flair", "dwi")}
    fine = subject.affine @ np.diag([1.0, 1.0, 0.5, 1.0])  # T1ce: 2 x 2 x 1 mm, the finest grid
    t1ce = np.repeat(volumes["t1ce"], 2, axis=2)
    geometry = {
        "t1ce": (t1ce, fine, session),
        "t2": (volumes["t2"], subject.affine, session),
        "flair": (volumes["flair"], _rigid(6.0, (8.0, -5.0, 10.0)) @ subject.affine, generate_uid()),
        "dwi": (volumes["dwi"], subject.affine, session),
    }
    uids = {}
    for modality, (volume, affine, frame) in geometry.items():
        number, description, extra = DEMO_SERIES[modality]
        datasets = series_datasets(
            volume, affine, number, description, study_uid, extra=extra, frame_of_reference=frame
        )
        save_series(datasets, root / modality)
        uids[modality] = str(datasets[0].SeriesInstanceUID)
    return root, uids


def _tiny_bundle(tmp_path: Path, single: bool = True, plus: bool = True) -> Path:
    from scripts.networks import MoME, MoMEPlus

    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundle", bundle, ignore=shutil.ignore_patterns("models", "training", "data", "__pycache__"))
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    for name, network, weights, wanted in (
        ("inference.json", MoME, "model.pt", single),
        ("inference_plus.json", MoMEPlus, "model_plus.pt", plus),
    ):
        path = bundle / "configs" / name
        config = {**json.loads(path.read_text()), **TINY}
        path.write_text(json.dumps(config, indent=1))
        arch = {k: config[k] for k in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage")}
        arch["n_conv_per_stage_decoder"] = config["n_conv_per_stage_decoder"]
        if wanted:
            classifier = {"modality_classifier": bool(config.get("modality_classifier"))} if network is MoME else {}
            model = MoME(5, 1, 2, **arch, **classifier) if network is MoME else MoMEPlus(4, 4, **arch)
            torch.save(model.state_dict(), bundle / "models" / weights)
    return bundle


class _TumourOracle(torch.nn.Module):
    """Stands in for a trained MoME+: enhancing where the z-scored T1ce channel is bright, oedema where FLAIR is."""

    def forward(self, x: torch.Tensor, availability: torch.Tensor | None = None) -> torch.Tensor:
        background = torch.zeros_like(x[:, :1])
        oedema = 3.0 * (x[:, 3:4] - 2.0)
        enhancing = 3.0 * (x[:, 1:2] - 2.5) + 1.0
        return torch.cat([background, background - 5.0, oedema, enhancing], dim=1)


def _segmenters(bundle: Path):
    from scripts.pipeline import MoMEPlusSegmenter, MoMESegmenter

    plus = MoMEPlusSegmenter(bundle, device="cpu")
    plus.network = _TumourOracle()
    return MoMESegmenter(bundle, device="cpu"), plus


def test_study_series_go_to_mome_plus_together(tmp_path, plus_study):
    from app.dicom_pipeline import run_dicom

    folder, uids = plus_study
    single, plus = _segmenters(_tiny_bundle(tmp_path))
    (report,) = run_dicom(folder, tmp_path / "out", single, plus_segmenter=plus, mode="auto")
    study_dir = next((tmp_path / "out").iterdir())
    entry = report["segmented"][uids["t1ce"]]
    assert entry["mode"] == "mome_plus" and entry["reference_modality"] == "t1ce", "the finest grid is the reference"
    assert entry["modalities_available"] == ["t1ce", "t2", "flair"] and entry["modalities_missing"] == ["t1"]
    assert entry["contributing_series"] == {m: uids[m] for m in ("t1ce", "t2", "flair")}
    assert entry["coregistration"]["t2"]["method"] == "frame of reference"
    flair = entry["coregistration"]["flair"]
    assert flair["method"] in ("rigid", "rigid via template") and not flair["warnings"]
    assert set(flair["candidates"]) == {"rigid", "template", "template + rigid"}, "every transform tried is reported"
    assert entry["seg"]["segments"] == ["Necrotic tumour core", "Peritumoral oedema", "Enhancing tumour"]
    assert entry["region_volume_ml"]["Peritumoral oedema"] > 1 and entry["region_volume_ml"]["Enhancing tumour"] > 1
    for modality in ("t2", "flair"):
        assert report["segmented"][uids[modality]]["used_in_mome_plus"] == uids["t1ce"]
    assert "seg" in report["segmented"][uids["dwi"]], "DWI still goes through single-modality MoME"
    assert report["summary"]["mome_plus"]["reference_modality"] == "t1ce"

    seg_path = study_dir / entry["seg"]["file"]
    seg = hd.seg.segread(seg_path)
    assert [int(d.SegmentNumber) for d in seg.SegmentSequence] == [1, 2, 3]
    referenced = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    assert referenced == {uids["t1ce"], uids["t2"], uids["flair"]}
    flair_instances = next(i for i in seg.ReferencedSeriesSequence if i.SeriesInstanceUID == uids["flair"])
    assert len(flair_instances.ReferencedInstanceSequence) == len(list((folder / "flair").glob("*.dcm")))
    assert int(seg.NumberOfFrames) == 3 * len(list((folder / "t1ce").glob("*.dcm"))), "one frame per slice and segment"
    sr = pydicom.dcmread(study_dir / entry["sr"]["file"])
    assert "Enhancing tumour" in str(sr.ContentSequence)
    if DCIODVFY:
        assert dciodvfy_errors(seg_path) == [], "the multi-series references are valid DICOM"


def test_mode_single_and_a_study_with_one_plus_modality(tmp_path, plus_study):
    from app.dicom_pipeline import run_dicom

    folder, uids = plus_study
    single, plus = _segmenters(_tiny_bundle(tmp_path))
    (report,) = run_dicom(folder, tmp_path / "single", single, plus_segmenter=plus, mode="single")
    assert all("mode" not in e and "seg" in e for e in report["segmented"].values()) and len(report["segmented"]) == 4
    (report,) = run_dicom(
        folder, tmp_path / "auto", single, modalities=["flair", "dwi"], plus_segmenter=plus, mode="auto"
    )
    assert all("mode" not in e for e in report["segmented"].values()), "auto needs two MoME+ modalities"
    (report,) = run_dicom(
        folder, tmp_path / "plus", single, modalities=["flair", "dwi"], plus_segmenter=plus, mode="plus"
    )
    entry = report["segmented"][uids["flair"]]
    assert entry["mode"] == "mome_plus" and entry["modalities_available"] == ["flair"]


def test_app_mode_flag_and_missing_mome_plus_model(tmp_path, plus_study, capsys):
    from app.cli.application import main

    folder, _ = plus_study
    bundle = _tiny_bundle(tmp_path, plus=False)
    code = main(["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(bundle), "--mode", "plus", "--quiet"])
    assert code == 2 and "--mode plus needs a MoME+ model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_app_graph_runs_mome_plus(tmp_path, plus_study):
    from app.cli.application import main

    folder, uids = plus_study
    bundle = _tiny_bundle(tmp_path)
    args = ["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(bundle), "--modalities", "t1ce", "t2", "--quiet"]
    assert main(args) == 0
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    entry = report["segmented"][uids["t1ce"]]
    assert entry["mode"] == "mome_plus" and entry["modalities_available"] == ["t1ce", "t2"]
    assert report["model"]["mome_plus"]["name"] == report["model"]["name"]
