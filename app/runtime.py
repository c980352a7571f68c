"""Process set-up shared by every entry point: make Holoscan importable on machines without a CUDA toolkit.

Holoscan (under the MONAI Deploy App SDK) links against ``libcudart.so.13`` even when it runs on the CPU. The
``nvidia-cuda-runtime`` wheel ships that library inside site-packages, where the dynamic loader does not look;
loading it once with ``RTLD_GLOBAL`` before Holoscan is imported satisfies the dependency. Machines with a CUDA 13
toolkit are unaffected.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

__all__ = ["CUDART_NAME", "find_wheel_cudart", "preload_cuda_runtime"]

logger = logging.getLogger(__name__)

CUDART_NAME = "libcudart.so.13"
_loaded: Path | None = None


def find_wheel_cudart() -> Path | None:
    """Path of ``libcudart.so.13`` from the ``nvidia-cuda-runtime`` wheel, or None when it is not installed."""
    for entry in sys.path:
        candidate = Path(entry or ".") / "nvidia" / "cu13" / "lib" / CUDART_NAME
        if candidate.is_file():
            return candidate
    return None


def preload_cuda_runtime() -> Path | None:
    """Loads the wheel's CUDA runtime globally (once); returns its path, or None when there is nothing to load."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    library = find_wheel_cudart()
    if library is None:
        logger.debug("no %s in site-packages; relying on the system loader", CUDART_NAME)
        return None
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        logger.warning("could not preload %s: %s", library, err)
        return None
    _loaded = library
    return library
