"""Output folder rules: an unusable ``-o`` is a usage error (exit 2) before any work, in every entry point; a re-run
replaces only the files MoME wrote (its manifest) and never deletes anything else; a failed publish leaves nothing."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import make_series
from pydicom.uid import generate_uid

from app.app import AppOptions
from app.cli import seg_main
from app.cli.application import main as app_main
from app.cli.application import run_app
from app.dicom_pipeline import run_dicom
from operators.output_folder import (
    MANIFEST,
    Staged,
    UnusableOutputFolder,
    check_output_folder,
    publish,
    read_manifest,
)

SHAPE = (24, 24, 10)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


class _Threshold:
    """Stands in for MoME without loading a model: 'lesion' where the image is brighter than its mean."""

    def describe(self) -> dict:
        return {"name": "threshold", "version": "0"}

    def segment(self, array, affine, name=None, modality=None, progress=None):
        labels = (array > array.mean()).astype(np.uint8)
        registration = SimpleNamespace(to_dict=lambda: {"warnings": []})
        return SimpleNamespace(
            labels=labels,
            registration=registration,
            mome_image=array,
            mome_labels=labels,
            mome_affine=affine,
            seconds={},
            inference={},
        )


def _volume() -> np.ndarray:
    volume = np.full(SHAPE, 100.0)
    volume[8:16, 8:16, 3:7] = 900.0
    return volume


@pytest.fixture
def two_flairs(tmp_path) -> tuple[Path, str]:
    """A study with two FLAIR series: ``--all-series`` segments both, the default only one."""
    study_uid, folder = generate_uid(), tmp_path / "in"
    for number, description in ((3, "AX FLAIR"), (4, "AX FLAIR REPEAT")):
        for index, ds in enumerate(make_series(_volume(), AFFINE, number, description, study_uid)):
            path = folder / description / f"{index:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
    return folder, study_uid


@pytest.fixture
def nifti(tmp_path) -> Path:
    path = tmp_path / "scan_flair.nii.gz"
    nib.save(nib.Nifti1Image(_volume().astype(np.float32), AFFINE), path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if an entry point loads a model, reads its input or starts the graph."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    for target in ("app.api._load_segmenter", "app.api.load_volume", "app.app.MoMEApp"):
        monkeypatch.setattr(target, refuse)
    monkeypatch.setattr("app.dicom_pipeline.dicom_root", refuse)


def _listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def _unusable(tmp_path: Path, case: str) -> Path:
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    return taken if case == "existing file" else taken / "out"


ENTRY_POINTS = {
    "mome-seg NIfTI": lambda source, out: seg_main([str(source / "scan_flair.nii.gz"), "-o", str(out), "--quiet"]),
    "mome-seg DICOM": lambda source, out: seg_main([str(source), "-o", str(out), "--quiet"]),
    "python -m app": lambda source, out: app_main(["-i", str(source), "-o", str(out), "--quiet"]),
    "run_app": lambda source, out: run_app(source, out, None, AppOptions(segmenter=_Threshold())),
}


@pytest.mark.parametrize("case", ["existing file", "below a file"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_an_unusable_output_folder_is_a_usage_error_before_any_work(tmp_path, capsys, no_work, entry, case):
    source = tmp_path / "in"
    source.mkdir()
    (source / "scan_flair.nii.gz").write_bytes(b"never read")
    out = _unusable(tmp_path, case)
    before = _listing(tmp_path)
    assert ENTRY_POINTS[entry](source, out) == 2
    message = capsys.readouterr().err
    assert str(out.resolve()) in message and "is not a folder" in message, message
    assert _listing(tmp_path) == before and (tmp_path / "taken.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["existing file", "below a file"])
def test_run_dicom_checks_the_output_folder_before_reading(tmp_path, no_work, case):
    out = _unusable(tmp_path, case)
    with pytest.raises(UnusableOutputFolder, match="is not a folder"):
        run_dicom(tmp_path, out, _Threshold())
    assert _listing(tmp_path) == ["taken.txt"]


def test_a_usable_output_folder_is_made_absolute_and_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_folder(Path("a") / "b") == tmp_path.resolve() / "a" / "b"
    assert check_output_folder(tmp_path) == tmp_path.resolve() and _listing(tmp_path) == []


def test_a_folder_the_process_cannot_write_is_refused(tmp_path, monkeypatch):
    """Runs as root too, where chmod does not stop writes: what ``os.access`` says is what counts."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(UnusableOutputFolder, match=re.escape(f"{locked}: the output folder is not writable")):
        check_output_folder(locked)
    with pytest.raises(UnusableOutputFolder, match=re.escape(f"{locked} is not writable")):
        check_output_folder(locked / "new" / "out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(UnusableOutputFolder, match="is not writable"):
            check_output_folder(parent / "out")
        assert seg_main([str(tmp_path), "-o", str(parent / "out"), "--quiet"]) == 2
        assert not (parent / "out").exists()
    finally:
        parent.chmod(0o755)


def _study_outputs(report: dict) -> list[str]:
    """The files a study report names: report.json and, per segmented series, its SEG, SR and QC image."""
    done = [entry for entry in report["segmented"].values() if "seg" in entry]
    return sorted(["report.json", *(name for e in done for name in (e["seg"]["file"], e["sr"]["file"], e["qc_png"]))])


def test_a_dicom_rerun_replaces_only_mome_files(tmp_path, two_flairs):
    folder, study_uid = two_flairs
    out, study = tmp_path / "out", tmp_path / "out" / study_uid
    assert run_app(folder, out, None, AppOptions(segmenter=_Threshold(), all_series=True)) == 0
    old = json.loads((study / "report.json").read_text())
    first = _study_outputs(old)
    assert sum(name.startswith("seg_") for name in first) == 2
    planted = {
        study / "notes.txt": "mine",
        study / "seg_mine.dcm": "not MoME's",
        study / "extra" / "keep.txt": "kept",
        out / "index.csv": "study list",
    }
    for path, text in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    assert run_app(folder, out, None, AppOptions(segmenter=_Threshold())) == 0  # one series per modality now
    new = json.loads((study / "report.json").read_text())
    second = _study_outputs(new)
    assert all(path.read_text() == text for path, text in planted.items())
    assert sum(name.startswith("seg_") for name in second) == 1 and set(second) < set(first)
    user_files = ["extra", "notes.txt", "seg_mine.dcm"]
    assert sorted(p.name for p in study.iterdir()) == sorted([*second, *user_files, MANIFEST])  # stale SEG gone
    (series_uid,) = new["segmented"]
    assert (
        new["segmented"][series_uid]["seg"]["sop_instance_uid"]
        != old["segmented"][series_uid]["seg"]["sop_instance_uid"]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.csv", study_uid])
    assert read_manifest(study) == dict.fromkeys(second, study_uid)
    assert not list(tmp_path.glob(".*mome-*")), "staging folders must be removed"


def test_a_nifti_rerun_replaces_only_mome_files_and_stages_beside_the_output(tmp_path, monkeypatch, nifti):
    import operators.output_folder

    staged = []
    staging_dir = operators.output_folder.staging_dir
    monkeypatch.setattr(
        operators.output_folder, "staging_dir", lambda out: staged.append(staging_dir(out)) or staged[-1]
    )
    monkeypatch.setattr("app.api._load_segmenter", lambda *args: _Threshold())
    out = tmp_path / "out"
    assert seg_main([str(nifti), "-o", str(out), "--save-mni", "--quiet"]) == 0
    assert (out / "scan_flair_mni.nii.gz").is_file() and (out / "scan_flair_mni_seg.nii.gz").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "other_seg.nii.gz").write_text("another tool's")

    assert seg_main([str(nifti), "-o", str(out), "--quiet"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "other_seg.nii.gz").read_text() == "another tool's"
    assert not (out / "scan_flair_mni.nii.gz").exists(), "the first run's MoME-space files are stale"
    product = ["report.json", "scan_flair_qc.png", "scan_flair_seg.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*product, "notes.txt", "other_seg.nii.gz", MANIFEST])
    assert "mni_image" not in json.loads((out / "report.json").read_text())["outputs"]
    assert read_manifest(out) == dict.fromkeys(product, nifti.name)
    assert [p.parent for p in staged] == [tmp_path, tmp_path] and all(p.name.startswith(".out.mome-") for p in staged)
    assert not any(p.exists() for p in staged)


def test_nifti_inputs_sharing_an_output_folder_keep_each_others_files(tmp_path, monkeypatch, nifti):
    monkeypatch.setattr("app.api._load_segmenter", lambda *args: _Threshold())
    other = tmp_path / "other_t1.nii.gz"
    other.write_bytes(nifti.read_bytes())
    out = tmp_path / "out"
    assert seg_main([str(nifti), "-o", str(out), "--save-mni", "--quiet"]) == 0
    assert seg_main([str(other), "-o", str(out), "--quiet"]) == 0
    mni = ["scan_flair_mni.nii.gz", "scan_flair_mni_seg.nii.gz"]
    first = ["scan_flair_qc.png", "scan_flair_seg.nii.gz", *mni]
    second = ["other_t1_qc.png", "other_t1_seg.nii.gz", "report.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*first, *second, MANIFEST])
    assert read_manifest(out) == {**dict.fromkeys(first, nifti.name), **dict.fromkeys(second, other.name)}
    assert seg_main([str(nifti), "-o", str(out), "--quiet"]) == 0  # the first input again, without --save-mni
    assert sorted(p.name for p in out.iterdir()) == sorted({*first, *second, MANIFEST} - set(mni))


def test_a_failed_nifti_write_leaves_nothing(tmp_path, monkeypatch, nifti):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("app.api._load_segmenter", lambda *args: _Threshold())
    monkeypatch.setattr("operators.qc_image.save_qc_png", disk_full)
    out = tmp_path / "deep" / "out"
    assert seg_main([str(nifti), "-o", str(out), "--quiet"]) == 1
    assert not out.exists() and not list(tmp_path.rglob(".*mome-*"))


def test_a_study_folder_that_is_a_file_is_a_usage_error_and_nothing_moves(tmp_path, two_flairs, capsys):
    folder, study_uid = two_flairs
    out = tmp_path / "out"
    out.mkdir()
    (out / study_uid).write_text("mine")
    assert run_app(folder, out, None, AppOptions(segmenter=_Threshold())) == 2
    assert f"{out / study_uid}: exists and is not a folder" in capsys.readouterr().err
    assert _listing(out) == [study_uid] and (out / study_uid).read_text() == "mine"
    assert not list(tmp_path.glob(".*mome-*"))


def _stage(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_publish_checks_every_target_before_moving_anything(tmp_path):
    good, bad = tmp_path / "out" / "a", tmp_path / "out" / "b"
    (bad / "report.json").mkdir(parents=True)  # a folder where MoME writes a file
    staged = [
        Staged(_stage(tmp_path / "s" / "a", **{"report.json": "a"}), good, "a"),
        Staged(_stage(tmp_path / "s" / "b", **{"report.json": "b"}), bad, "b"),
    ]
    with pytest.raises(UnusableOutputFolder, match="a folder where MoME writes a file"):
        publish(staged)
    assert not good.exists() and _listing(bad) == ["report.json"]


def test_publish_ignores_manifest_entries_outside_its_folder(tmp_path):
    target = tmp_path / "out" / "study"
    target.mkdir(parents=True)
    (tmp_path / "out" / "victim.txt").write_text("mine")
    (target / "folder").mkdir()
    (target / "old.png").write_text("stale")
    outside = ["../victim.txt", str(tmp_path / "out" / "victim.txt"), "folder", "missing.dcm"]
    (target / MANIFEST).write_text(json.dumps({"files": {**dict.fromkeys(outside, "s"), "old.png": "s", "x": 7}}))
    publish([Staged(_stage(tmp_path / "s", **{"report.json": "new"}), target, "s")])
    assert (tmp_path / "out" / "victim.txt").read_text() == "mine" and (target / "folder").is_dir()
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "folder", "report.json"]
    assert read_manifest(target) == {"report.json": "s"}


def test_publish_copies_across_file_systems(tmp_path, monkeypatch):
    """An output folder that is a mount point (the MAP's /var/holoscan/output): rename fails with EXDEV."""
    staged = _stage(tmp_path / "s", **{"report.json": "new", "seg_1.dcm": "seg"})
    rename = os.replace

    def cross_device(source, target):
        if Path(source).parent == staged:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(source, target)

    monkeypatch.setattr(os, "replace", cross_device)
    publish([Staged(staged, tmp_path / "out", "s")])
    assert (tmp_path / "out" / "report.json").read_text() == "new" and (
        tmp_path / "out" / "seg_1.dcm"
    ).read_text() == "seg"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, "report.json", "seg_1.dcm"]
    assert list(staged.iterdir()) == []
