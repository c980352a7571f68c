"""How the CPU MAP image is built and run with each engine, and its entry point, without an engine.

The image itself is built and run by ``make map-check`` (tests/map); these pin the commands and the entry point's
contract: the application's exit status and signals reach whoever runs the container.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app
from app.map_package import ENTRYPOINT
from app.map_package.image import BuildSpec, Engine, MapImageError, apt_mirror, detect_engine

REPO = Path(__file__).resolve().parents[2]


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, value in enumerate(argv[:-1]) if value == flag]


def test_podman_builds_daemonless_with_the_wheel_folder_and_the_products_version(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    (tmp_path / "ca.crt").touch()
    spec = BuildSpec(tmp_path / "ctx", "mome-app-cpu:x", "localhost/base", tmp_path / "wheels", tmp_path / "ca.crt")
    argv = Engine("podman", "overlay").build_argv(spec)
    assert argv[:2] == ["podman", "build"] and argv[-1] == str(tmp_path / "ctx")
    assert _pairs(argv, "--isolation") == ["chroot"] and _pairs(argv, "--network") == ["host"]
    assert "--layers=false" not in argv
    assert f"-v={tmp_path / 'wheels'}:/mome-wheels:ro" in argv and f"-v={tmp_path / 'ca.crt'}:/mome-ca.crt:ro" in argv
    args = dict(pair.split("=", 1) for pair in _pairs(argv, "--build-arg"))
    assert args == {
        "MOME_VERSION": app.__version__,
        "BASE_IMAGE": "localhost/base",
        "WHEELS": "/mome-wheels",
        "PIP_CERT": "/mome-ca.crt",
        "TORCH_INDEX_URL": "https://pypi.org/simple",  # the folder holds the CPU torch; its dependencies come from PyPI
    }
    assert _pairs(argv, "-f") == [str(REPO / "Dockerfile")] and _pairs(argv, "-t") == ["mome-app-cpu:x"]


def test_vfs_storage_builds_without_intermediate_layers_and_docker_refuses_mounts(tmp_path):
    plain = BuildSpec(tmp_path)
    assert "--layers=false" in Engine("podman", "vfs").build_argv(plain)
    assert "--layers=false" in Engine("buildah", "vfs").build_argv(plain)
    docker = Engine("docker").build_argv(plain)
    assert docker[:2] == ["docker", "build"] and "--isolation" not in docker
    assert dict(p.split("=", 1) for p in _pairs(docker, "--build-arg")) == {"MOME_VERSION": app.__version__}
    with pytest.raises(MapImageError, match="docker build cannot mount"):
        Engine("docker").build_argv(BuildSpec(tmp_path, wheels=tmp_path))


def test_a_run_mounts_the_study_read_only_has_no_network_and_runs_as_the_caller(tmp_path):
    argv = Engine("podman").run_argv("img:1", tmp_path / "in", tmp_path / "out", ["--help"], name="job")
    assert argv[:3] == ["podman", "run", "--rm"] and argv[-2:] == ["img:1", "--help"]
    assert _pairs(argv, "--network") == ["none"] and _pairs(argv, "--user") == [f"{os.getuid()}:{os.getgid()}"]
    assert _pairs(argv, "-v") == [
        f"{tmp_path / 'in'}:/var/holoscan/input:ro",
        f"{tmp_path / 'out'}:/var/holoscan/output",
    ]
    assert _pairs(argv, "--shm-size") == ["1g"]  # app.yaml's resources.sharedMemory, as pkg.json has it
    assert _pairs(argv, "-e") == ["HOLOSCAN_HOSTING_SERVICE=HOLOSCAN_RUN"] and _pairs(argv, "--name") == ["job"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert _pairs(argv, "--ulimit") == [f"nofile={soft}:{hard}", "nproc=4096:4096"]
    assert "--ulimit" not in Engine("docker").run_argv("img:1", tmp_path, tmp_path)
    with pytest.raises(MapImageError, match="buildah cannot run"):
        Engine("buildah").run_argv("img:1", tmp_path, tmp_path)


def test_engine_detection_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no engine on it
    with pytest.raises(MapImageError, match="no container engine: install docker"):
        detect_engine()
    with pytest.raises(MapImageError, match="unknown container engine 'rkt'"):
        detect_engine("rkt")
    env = {**os.environ, "PATH": f"{tmp_path}:{Path(sys.executable).parent}"}
    result = subprocess.run(
        [sys.executable, "-m", "app.map_package", "run", "--engine", "podman", "--input", "x", "--output", "y"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "error: no container engine: install podman" in result.stderr


def test_the_debian_mirror_is_the_one_apt_uses(tmp_path):
    assert apt_mirror(tmp_path) == "http://deb.debian.org/debian"
    (tmp_path / "etc/apt").mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list").write_text(
        "# comment\ndeb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://mirror.example/debian bookworm main\n"
    )
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "etc/apt/sources.list.d").mkdir()
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/x\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://deb822.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert apt_mirror(tmp_path) == "http://deb822.example/debian"


@pytest.fixture()
def manifest(tmp_path) -> dict[str, str]:
    """An app.json whose command is a stand-in application: exits 3, or 143 on SIGTERM after saying it is ready."""
    script = tmp_path / "application.sh"
    script.write_text('trap "exit 143" TERM\necho "ready $*"\n[ "$1" = wait ] || exit 3\nsleep 30 & wait\n')
    (tmp_path / "app.json").write_text(json.dumps({"command": json.dumps(["bash", str(script)])}))
    return {**os.environ, "HOLOSCAN_APP_MANIFEST_PATH": str(tmp_path / "app.json")}


def test_the_entry_point_passes_on_the_applications_exit_status(manifest):
    result = subprocess.run([str(ENTRYPOINT), "--quiet"], env=manifest, capture_output=True, text=True)
    assert result.returncode == 3 and result.stdout == "ready --quiet\n"


def test_the_entry_point_hands_sigterm_to_the_application(manifest):
    with subprocess.Popen([str(ENTRYPOINT), "wait"], env=manifest, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline() == "ready wait\n"
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends to the container's first process
        assert process.wait(timeout=10) == 143


def test_the_build_takes_the_wheel_folder_and_ca_bundle_this_hosts_pip_uses(monkeypatch, tmp_path):
    from app.map_package.__main__ import _from_pip

    (tmp_path / "ca.crt").touch()
    monkeypatch.setenv("PIP_FIND_LINKS", f"https://example.org/links {tmp_path}")
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "ca.crt"))
    assert _from_pip("pip", "find-links", Path.is_dir) == tmp_path  # the first entry that is a folder
    assert _from_pip("pip", "cert", Path.is_file) == tmp_path / "ca.crt"
    assert _from_pip(None, "cert", Path.is_file) is None
    with pytest.raises(MapImageError, match="--wheels /nonexistent does not exist"):
        _from_pip("/nonexistent", "find-links", Path.is_dir)
