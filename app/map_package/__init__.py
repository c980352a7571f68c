"""Builds the MONAI Application Package (MAP) build context for the MoME Deploy application.

``monai-deploy package`` (holoscan-cli 4.2.0, the last release that ships it) packages *an application folder*: it
copies the folder to ``/opt/holoscan/app`` and runs ``python3 /opt/holoscan/app``. This module stages that folder
(``__main__.py``, the ``app`` and ``operators`` packages, ``requirements.txt``) and, with ``--context``, runs the real
packager in-process up to the point where it would call Docker, keeping the generated build context (Dockerfile,
``map/app.json``, ``map/pkg.json``, ``pip/requirements.txt``, ``models/``) for inspection or a later
``docker build``. No Docker engine and no network are needed for that (the artifacts manifest ships with us).

Usage (from the repository root; ``VERSION`` is ``app.__version__``, the one version of the product)::

    python -m app.map_package stage --out build/map_app                     # the application folder only
    python -m app.map_package stage --out build/map_app --context build/map_ctx [--tag mome-app:VERSION]
    python -m app.map_package build [--base IMAGE] [--engine podman]        # the CPU image (make map; image.py)
    python -m app.map_package run --input STUDY --output OUT [IMAGE]        # as a MAP runs (make map-run)

    # with Docker + buildx + registry access, the GPU MAP on the SDK's CUDA base:
    monai-deploy package build/map_app -c build/map_app/app.yaml -t mome-app:VERSION --platform x86_64 \\
        -m build/map_app_models --source app/packaging/holoscan-cli-artifacts-4.2.0.json
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from unittest import mock

from app import __version__

__all__ = ["ARTIFACTS", "DEFAULT_TAG", "MODEL_NAME", "build_context", "stage_application", "stage_models"]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "app" / "packaging" / "holoscan-cli-artifacts-4.2.0.json"
APP_CONFIG = REPO / "app" / "app.yaml"
ENTRYPOINT = Path(__file__).with_name("entrypoint.sh")  # the CPU image's; the Dockerfile copies it from the context
MAIN = '''"""MAP entry point: ``python3 /opt/holoscan/app`` runs the MoME Deploy application (HOLOSCAN_* paths).

The work runs in a supervised child (``app.cli.supervisor``): SIGTERM from the orchestrator stops it with exit 143 and
nothing partial left behind.
"""

import sys

from app.cli.supervisor import is_supervised, supervise

if is_supervised():
    from app.cli.application import main

    sys.exit(main())
sys.exit(supervise([sys.executable, sys.argv[0], *sys.argv[1:]], "mome-app"))
'''
MODEL_NAME = "mome"
DEFAULT_TAG = f"mome-app:{__version__}"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "packaging", "entrypoint.sh")


def stage_application(out: Path) -> Path:
    """Writes the application folder that ``monai-deploy package`` takes; returns it."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "__main__.py").write_text(MAIN)
    for package in ("app", "operators"):
        shutil.copytree(REPO / package, out / package, ignore=IGNORED)
    shutil.copy2(REPO / "app" / "requirements.txt", out / "requirements.txt")
    config = APP_CONFIG.read_text()
    (out / "app.yaml").write_text(re.sub(r"(?m)^(\s*version:).*$", rf"\g<1> {__version__}", config, count=1))
    return out


def stage_models(bundle: Path, out: Path, name: str = MODEL_NAME) -> Path:
    """A models folder holding the bundle as ``<name>/`` (the MAP's ``/opt/holoscan/models/<name>``); returns it."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(bundle, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data", "training"))
    return out


def build_context(application: Path, context: Path, bundle: Path, tag: str = DEFAULT_TAG) -> Path:
    """Runs holoscan-cli's packager without Docker and copies its build context to ``context``; returns it."""
    from holoscan_cli.__main__ import main as holoscan_cli
    from holoscan_cli.packager import container_builder

    def keep_context(builder, dockerfile, platform_parameters):
        if context.exists():
            shutil.rmtree(context)
        shutil.copytree(builder._temp_dir, context)
        result = container_builder.PlatformBuildResults(platform_parameters)
        result.succeeded = True
        return result

    models = stage_models(bundle, application.parent / f"{application.name}_models")
    argv = ["monai-deploy", "package", str(application), "-c", str(application / "app.yaml"), "-t", tag]
    argv += ["--platform", "x86_64", "-m", str(models), "--source", str(ARTIFACTS), "-l", "WARN"]
    patch_build = mock.patch.object(container_builder.BuilderBase, "_build_internal", keep_context)
    with patch_build, mock.patch.object(sys, "argv", argv):  # the CLI picks the SDK from sys.argv[0]
        holoscan_cli(argv)
    if not (context / "Dockerfile").is_file():
        raise RuntimeError(f"the packager did not produce a Dockerfile in {context}")
    shutil.copy2(ENTRYPOINT, context / ENTRYPOINT.name)
    return context
