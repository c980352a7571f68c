"""DICOM study -> router -> native-space MoME -> DICOM-SEG + report (no Holoscan), and `mome-seg` on DICOM input."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_factory import DCIODVFY, dciodvfy_errors
from pydicom.uid import generate_uid

from app.cli import seg_main
from app.dicom_pipeline import NothingToSegment, run_dicom
from operators.dicom_series import series_to_volume


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


class _BrightnessOracle(torch.nn.Module):
    """Stands in for a trained MoME: calls 'lesion' where the z-scored input is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 4.0 * (x - 3.0)], dim=1)


def test_study_is_routed_segmented_and_written_on_the_source_grid(tmp_path, tiny_bundle, study):
    from scripts.pipeline import MoMESegmenter

    folder, truth, study_uid = study
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    segmenter.network = _BrightnessOracle()
    reports = run_dicom(folder, tmp_path / "out", segmenter)
    report = json.loads((tmp_path / "out" / study_uid / "report.json").read_text())
    assert reports == [report] and report["summary"]["segmented_series"] == 1
    decisions = {d["description"]: d for d in report["series"]}
    assert decisions["AX FLAIR"]["modality"] == "flair" and decisions["Localizer"]["rule"] == "localizer-text"
    assert decisions["HEAD CT"]["rule"] == "not-mr" and report["skipped_non_dicom_files"] == 1
    (result,) = report["segmented"].values()
    assert result["modality"] == "flair" and result["registration"]["template_contrast"] == "flair"
    seg = hd.seg.segread(tmp_path / "out" / study_uid / result["seg"]["file"])
    assert str(seg.SOPInstanceUID) == result["seg"]["sop_instance_uid"] and int(seg.NumberOfFrames) == truth.shape[2]
    # Rebuild the label volume slice by slice from the SEG's source references (sorted along the slice normal).
    volume = series_to_volume([pydicom.dcmread(p) for p in sorted((folder / "flair").rglob("*.dcm"))])
    frames = [
        seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True)[0]
        for ds in volume.instances
    ]
    labels = np.stack(frames).transpose(2, 1, 0) > 0
    nifti = nib.load(next((folder.parent / "nifti").rglob("*_0000.nii.gz")))
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-3)
    # The same scan as NIfTI through the same pipeline gives the same labels: nothing flipped, shifted or reordered.
    direct = segmenter.segment(np.asarray(nifti.dataobj, np.float32), nifti.affine, modality="flair").labels > 0
    assert direct.sum() > 100 and (direct & truth).sum() > 0.9 * direct.sum()  # the oracle is precise
    agreement = 2 * (labels & direct).sum() / (labels.sum() + direct.sum())
    assert agreement > 0.99, agreement  # header rounding (IOP 8, IPP 6 decimals) may flip a few border voxels
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000
    assert result["lesion_volume_ml"] == pytest.approx(labels.sum() * voxel_ml, abs=1e-3)


def test_mome_seg_on_a_zip_and_rejections(tmp_path, tiny_bundle, study):
    folder, _, study_uid = study
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in folder.rglob("*"):
            zipped.write(path, path.relative_to(folder))
    out = tmp_path / "out"
    assert seg_main([str(archive), "-o", str(out), "--model", str(tiny_bundle), "--quiet"]) == 0
    assert (out / study_uid / "report.json").is_file() and len(list((out / study_uid).glob("qc_*.png"))) == 1
    assert len(list((out / study_uid).glob("seg_*.dcm"))) == 1
    # only the localizer and the CT: nothing to segment, exit 3, nothing written
    only_rejects = tmp_path / "rejects"
    for name in ("loc", "ct"):
        for path in (folder / name).rglob("*.dcm"):
            target = only_rejects / name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    empty_out = tmp_path / "nothing"
    assert seg_main([str(only_rejects), "-o", str(empty_out), "--model", str(tiny_bundle), "--quiet"]) == 3
    assert not empty_out.exists()
    no_dicom = tmp_path / "no_dicom"
    no_dicom.mkdir()
    (no_dicom / "notes.txt").write_text("hello")
    with pytest.raises(NothingToSegment, match="no DICOM image instances found \\(1 other files\\)"):
        run_dicom(no_dicom, tmp_path / "x", segmenter=None)


def _seg_labels(path: Path) -> np.ndarray:
    seg = hd.seg.segread(path)
    return seg.pixel_array


def test_deploy_graph_writes_what_the_sequential_pipeline_writes(tmp_path, tiny_bundle, study):
    """``python -m app``'s Holoscan graph and ``run_dicom`` share their stages: same routing, same SEG frames."""
    from app.api import AppOptions, segment_study
    from scripts.pipeline import MoMESegmenter

    folder, truth, study_uid = study
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    segmenter.network = _BrightnessOracle()
    run_dicom(folder, tmp_path / "plain", segmenter)
    options = AppOptions(segmenter=segmenter)
    result = segment_study(folder, tmp_path / "graph", model=tiny_bundle, options=options)  # raises unless exit 0
    plain, graph = (json.loads((tmp_path / k / study_uid / "report.json").read_text()) for k in ("plain", "graph"))
    assert graph["series"] == plain["series"] and graph["summary"] == plain["summary"]
    (entry,) = graph["segmented"].values()
    assert entry["lesion_volume_ml"] > 1 and entry["qc_png"].endswith(".png") and entry["seconds"]["seg_write"] > 0
    files = {p.name for p in (tmp_path / "graph" / study_uid).iterdir()}
    assert files == {p.name for p in (tmp_path / "plain" / study_uid).iterdir()} and len(files) == 5  # + manifest
    sr = hd.sr.srread(tmp_path / "graph" / study_uid / entry["sr"]["file"])
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.get_measurements()[0].value == pytest.approx(entry["lesion_volume_ml"])
    assert group.referenced_segment.referenced_sop_instance_uid == entry["seg"]["sop_instance_uid"]
    name = entry["seg"]["file"]
    np.testing.assert_array_equal(
        _seg_labels(tmp_path / "graph" / study_uid / name), _seg_labels(tmp_path / "plain" / study_uid / name)
    )
    assert result.reports and result.reports[0]["study_instance_uid"] == study_uid
    if DCIODVFY:
        assert dciodvfy_errors(tmp_path / "graph" / study_uid / name) == []
        assert dciodvfy_errors(tmp_path / "graph" / study_uid / entry["sr"]["file"]) == []
    assert not list(tmp_path.glob(".*mome-*")), "staging folders must be removed"


def test_python_m_app_exit_codes(tmp_path, tiny_bundle, study, capsys):
    from app.cli.application import main

    folder, _, study_uid = study
    out = tmp_path / "out"
    assert main(["-i", str(folder), "-o", str(out), "-m", str(tiny_bundle), "--quiet", "--modalities", "flair"]) == 0
    assert len(list((out / study_uid).glob("seg_*.dcm"))) == 1
    # --modalities without FLAIR: nothing to segment -> exit 3, nothing written
    nothing = tmp_path / "nothing"
    assert main(["-i", str(folder), "-o", str(nothing), "-m", str(tiny_bundle), "--quiet", "--modalities", "t1"]) == 3
    assert not nothing.exists() and not list(tmp_path.glob(".*mome-*"))
    assert "AX FLAIR: modality not requested" in capsys.readouterr().err
    # a model folder that is not a bundle -> usage error 2
    not_a_bundle = tmp_path / "models"
    (not_a_bundle / "a").mkdir(parents=True)
    assert main(["-i", str(folder), "-o", str(tmp_path / "o2"), "-m", str(not_a_bundle), "--quiet"]) == 2
    assert main(["--no-such-flag"]) == 2
    # a malformed rules file is a usage error (2); an input that is neither folder nor zip is rejected (3)
    rules = tmp_path / "rules.json"
    rules.write_text('{"rules": [{"name": "x", "action": "ct"}]}')
    assert main(["-i", str(folder), "-o", str(tmp_path / "o3"), "-m", str(tiny_bundle), "--rules", str(rules)]) == 2
    assert "rules.json: rule 'x': action must be one of" in capsys.readouterr().err
    not_an_archive = tmp_path / "study.txt"
    not_an_archive.write_text("not DICOM")
    assert main(["-i", str(not_an_archive), "-o", str(tmp_path / "o4"), "-m", str(tiny_bundle), "--quiet"]) == 3
    assert "not a folder or a zip archive" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


def test_the_api_refuses_a_model_path_that_does_not_exist(tmp_path, study):
    """Only the SDK's own default ``models`` may be missing (it means the installed bundle); a caller's typo may not."""
    from app.api import segment_study

    with pytest.raises(FileNotFoundError, match="no_such_bundle: no such model folder"):
        segment_study(study[0], tmp_path / "out", model=tmp_path / "no_such_bundle")
    assert not (tmp_path / "out").exists()


def test_several_studies_in_one_input_get_one_output_folder_each(tmp_path, tiny_bundle, study):
    from app.api import AppOptions, segment_study
    from scripts.pipeline import MoMESegmenter

    folder, _, first_uid = study
    second_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted((folder / "flair").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = second_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = tmp_path / "in" / "second" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    for path in folder.rglob("*.dcm"):
        target = tmp_path / "in" / "first" / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    segmenter.network = _BrightnessOracle()
    options = AppOptions(segmenter=segmenter)
    result = segment_study(tmp_path / "in", tmp_path / "out", model=tiny_bundle, options=options)  # raises unless 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([first_uid, second_uid])
    reports = {r["study_instance_uid"]: r for r in result.reports}
    assert reports[second_uid]["summary"]["series_in_study"] == 1
    assert reports[first_uid]["summary"]["series_in_study"] == 3
    volumes = [r["summary"]["lesion_volume_ml"]["flair"] for r in reports.values()]
    assert volumes[0] == pytest.approx(volumes[1])  # the same pixels in both studies
