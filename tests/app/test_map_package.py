"""MAP packaging without a Docker engine: app.yaml, the packager's real build context, our CPU Dockerfile, and the
packaged application run the way the MAP runs it (``python3 /opt/holoscan/app`` with HOLOSCAN_* paths)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.map_package import MODEL_NAME, build_context, stage_application

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def context(tmp_path_factory, tiny_bundle) -> Path:
    root = tmp_path_factory.mktemp("map")
    application = stage_application(root / "map_app")
    return build_context(application, root / "map_ctx", tiny_bundle, tag="mome-app:test")


def test_app_yaml_is_accepted_by_the_packagers_config_reader():
    from holoscan_cli.packager.config_reader import ApplicationConfiguration

    config = ApplicationConfiguration()
    config.read(REPO / "app" / "app.yaml")
    assert config.title().startswith("MoME") and config.pip_packages() is None


def test_packager_build_context_has_the_map_layout(context):
    app_json = json.loads((context / "map" / "app.json").read_text())
    pkg_json = json.loads((context / "map" / "pkg.json").read_text())
    assert json.loads(app_json["command"]) == ["python3", "/opt/holoscan/app"] and app_json["sdk"] == "monai-deploy"
    assert app_json["environment"]["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert pkg_json["resources"]["gpu"] == 0
    assert pkg_json["models"] == {MODEL_NAME: f"/opt/holoscan/models/{MODEL_NAME}"}
    assert (context / "models" / MODEL_NAME / "configs" / "inference.json").is_file()
    assert (context / "models" / MODEL_NAME / "models" / "model.pt").is_file()
    assert {p.name for p in (context / "app").iterdir()} >= {"__main__.py", "app", "operators", "requirements.txt"}
    requirements = (context / "pip" / "requirements.txt").read_text()
    assert "\ntorch==2.13.0\n" in requirements and "holoscan-cu13==4.2.0" in requirements
    assert "holoscan-cli==4.2.0" in requirements  # the release whose tools script and manifests the MAP carries
    assert "COPY ./app /opt/holoscan/app" in (context / "Dockerfile").read_text()
    assert os.access(context / "entrypoint.sh", os.X_OK)


def test_cpu_dockerfile_matches_the_packager_context(context):
    dockerfile = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.MULTILINE):
        assert (context / source).exists(), f"Dockerfile copies {source}, which the build context lacks"
    app_json = json.loads((context / "map" / "app.json").read_text())
    env = dict(re.findall(r"(HOLOSCAN_\w+)=(\S+)", dockerfile))
    for key in ("HOLOSCAN_MODEL_PATH", "HOLOSCAN_APPLICATION", "HOLOSCAN_APP_MANIFEST_PATH", "HOLOSCAN_CONFIG_PATH"):
        assert env[key] == app_json["environment"][key].rstrip("/"), key
    assert "nvcr.io" not in dockerfile and "cuda" not in dockerfile.split("FROM", 1)[1].split("\n", 1)[0].lower()
    # the CPU build of the pinned torch comes first, from the PyTorch CPU index: never PyPI's multi-GB CUDA build
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert dockerfile.index('"$torch"') < dockerfile.index("-r /tmp/requirements.txt")
    assert 'ENTRYPOINT ["/opt/holoscan/entrypoint.sh"]' in dockerfile


def test_packaged_application_runs_like_the_map(context, study, tmp_path):
    """``python3 <ctx>/app`` with only HOLOSCAN_* variables, as the container's tools script launches it."""
    folder, _, study_uid = study
    env = {
        **os.environ,
        "HOLOSCAN_INPUT_PATH": str(folder),
        "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "output"),
        "HOLOSCAN_MODEL_PATH": str(context / "models"),
        "HOLOSCAN_LOG_LEVEL": "ERROR",
    }
    env.pop("MOME_BUNDLE", None)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(context / "app"), "--quiet"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "output" / study_uid / "report.json").read_text())
    assert report["summary"]["segmented_series"] == 1 and report["model"]["bundle"].endswith(f"models/{MODEL_NAME}")
