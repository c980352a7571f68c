"""`import app` preloads the CUDA runtime wheel so Holoscan imports without a CUDA toolkit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_import_app_preloads_the_wheel_cudart():
    import app
    from app.runtime import CUDART_NAME, find_wheel_cudart, preload_cuda_runtime

    library = find_wheel_cudart()
    assert library is not None and library.name == CUDART_NAME, "nvidia-cuda-runtime wheel not installed"
    assert preload_cuda_runtime() == library
    assert app.__version__
    maps = Path("/proc/self/maps").read_text()
    assert str(library.resolve()) in maps or str(library) in maps


TOOLKIT = Path("/usr/local/cuda-13.0")


@pytest.mark.skipif(
    not (TOOLKIT.is_dir() and shutil.which("unshare") and os.geteuid() == 0),
    reason="needs root, unshare and a system CUDA 13 toolkit to hide",
)
def test_holoscan_imports_with_the_toolkit_hidden(tmp_path):
    """Bind an empty folder over the system toolkit (only in a private mount namespace) and import the SDK."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code = "import app, holoscan, monai.deploy.core; print('IMPORTED')"
    script = f'mount --bind {empty} {TOOLKIT} && cd {REPO} && {sys.executable} -c "{code}"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if "mount:" in result.stderr and result.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORTED" in result.stdout

    plain = f"mount --bind {empty} {TOOLKIT} && {sys.executable} -c 'import holoscan'"
    without = subprocess.run(["unshare", "-m", "sh", "-c", plain], capture_output=True, text=True, timeout=300)
    assert without.returncode != 0 and "libcudart.so.13" in without.stderr, "the test did not hide the toolkit"
