"""The CPU MAP image for real: run as a MAP runs (mounted study and output, HOLOSCAN_* variables, no network).

These need a built image, named by ``MOME_MAP_IMAGE``: ``make map-check`` (run by CI after ``make test``) builds one
and runs them; elsewhere they are skipped. ``MOME_MAP_ENGINE`` picks docker, podman or buildah+podman (default: the
first that works).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import DCIODVFY, dciodvfy_errors, make_series

import app
from app.demo_study import make_demo_study, save_series
from app.map_package.image import detect_engine, run_map

IMAGE = os.environ.get("MOME_MAP_IMAGE")
RUN_TIMEOUT_S = 900
pytestmark = pytest.mark.skipif(not IMAGE, reason="needs a built MAP image: make map-check builds one and runs these")


@pytest.fixture(scope="module")
def engine():
    return detect_engine(os.environ.get("MOME_MAP_ENGINE", "auto"))


@pytest.fixture(scope="module")
def demo(engine, tmp_path_factory) -> dict:
    """The demo study through the image, and through ``python -m app`` on this host for comparison."""
    root = tmp_path_factory.mktemp("map_demo")
    info = make_demo_study(root / "study")
    result = run_map(IMAGE, root / "study" / "dicom", root / "out", engine, timeout=RUN_TIMEOUT_S)
    host = subprocess.run(
        [sys.executable, "-m", "app", "-i", str(root / "study" / "dicom"), "-o", str(root / "host"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert host.returncode == 0, host.stderr[-3000:]
    return {"info": info, "result": result, "out": root / "out" / info["study_uid"], "host": root / "host"}


def _segs(folder: Path) -> dict[str, pydicom.Dataset]:
    """The SEGs of an output folder by the series they segment."""
    segs = [pydicom.dcmread(path) for path in sorted(folder.glob("seg_*.dcm"))]
    return {str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID): seg for seg in segs}


def test_the_image_carries_the_products_version_and_the_map_layout(engine, tmp_path):
    config = engine.inspect(IMAGE)["Config"]
    assert config["Labels"]["org.opencontainers.image.version"] == app.__version__
    assert config["User"] == "holoscan" and config["WorkingDir"] == "/var/holoscan"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models" and env["HOLOSCAN_INPUT_PATH"] == "/var/holoscan/input"
    shown = subprocess.run(engine.run_argv(IMAGE, tmp_path, tmp_path, ["show"]), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    manifests = shown.stdout.split("=" * 30)
    pkg = json.loads(next(part for part in manifests if '"models"' in part and "applicationRoot" in part))
    assert pkg["version"] == app.__version__ and pkg["models"] == {"mome": "/opt/holoscan/models/mome"}


def test_the_map_segments_the_demo_study_on_the_source_geometry(demo):
    result, out, info = demo["result"], demo["out"], demo["info"]
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["segmented_series"] == 2 and report["model"]["bundle"] == "/opt/holoscan/models/mome"
    sources = {modality: entry["series_uid"] for modality, entry in info["series"].items()}
    segs = _segs(out)
    assert set(segs) == {sources["dwi"], sources["t1ce"]} and len(list(out.glob("sr_*.dcm"))) == 2
    positions = {}
    for path in (demo["out"].parents[1] / "study" / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        positions[str(ds.SOPInstanceUID)] = (ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing)
    for seg in segs.values():
        shared = seg.SharedFunctionalGroupsSequence[0]
        for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on the slice it refers to
            source = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            position, orientation, spacing = positions[source]
            np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient, position, atol=1e-3)
            np.testing.assert_allclose(
                shared.PlaneOrientationSequence[0].ImageOrientationPatient, orientation, atol=1e-4
            )
            np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, spacing, atol=1e-4)
        assert hd.seg.Segmentation.from_dataset(seg).number_of_segments >= 1
    for path in [*out.glob("seg_*.dcm"), *out.glob("sr_*.dcm")]:
        assert path.stat().st_uid == os.getuid()  # written as the caller, as `monai-deploy run` runs a MAP
        if DCIODVFY:
            assert dciodvfy_errors(path) == [], path.name


def test_the_maps_segmentations_equal_the_host_runs(demo):
    """The same pinned stack in the image and on the host: the labels agree voxel for voxel."""
    assert demo["result"].returncode == 0, demo["result"].stderr[-3000:]
    container, host = _segs(demo["out"]), _segs(demo["host"] / demo["info"]["study_uid"])
    assert set(container) == set(host)
    for series_uid, seg in container.items():
        assert np.array_equal(seg.pixel_array, host[series_uid].pixel_array), series_uid


def test_a_study_that_must_be_rejected_exits_3_and_writes_nothing(engine, tmp_path):
    ct = make_series(np.full((24, 24, 10), 40.0), np.diag([1.0, 1.0, 2.0, 1.0]), 2, "HEAD CT", modality="CT")
    save_series(ct, tmp_path / "study" / "ct")
    result = run_map(IMAGE, tmp_path / "study", tmp_path / "out", engine, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "HEAD CT" in result.stdout + result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_stopping_the_container_stops_the_application_with_143_and_nothing_written(engine, demo, tmp_path):
    """``docker stop`` / ``podman stop`` (SIGTERM to the container's first process) while MoME runs."""
    study = demo["out"].parents[1] / "study" / "dicom"
    name = f"mome-map-stop-{os.getpid()}"
    argv = engine.run_argv(IMAGE, study, tmp_path / "out", name=name)
    (tmp_path / "out").mkdir()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as running:
        for line in running.stdout:  # stop once the application is at work
            if "registering" in line:
                break
        subprocess.run([engine.name, "stop", "--time", "60", name], capture_output=True, timeout=120)
        log = running.stdout.read()
        assert running.wait(timeout=120) == 143, log[-3000:]
    assert list((tmp_path / "out").iterdir()) == []
