"""Which MoME weights the MONAI Label app serves: the bundle's shipped ``models/model.pt``, or the latest fine-tuned
file in the app's model folder (written by the train task, possibly in another process). The shipped file is never
written; removing the fine-tuned file (``restore``) serves the shipped weights again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["ServedWeights"]


class ServedWeights:
    """The shipped and fine-tuned weight files of one model, and which of them a network holds.

    Args:
        shipped: the bundle's weights (read only).
        fine_tuned: where fine-tuned weights are kept; they win while the file exists.
    """

    def __init__(self, shipped: Path, fine_tuned: Path) -> None:
        self.shipped, self.fine_tuned = Path(shipped), Path(fine_tuned)
        self._loaded: dict[int, tuple[Path, int, int]] = {}  # id(network) -> (file, mtime_ns, size) it holds
        self._digests: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def current(self) -> Path:
        """The file served now."""
        return self.fine_tuned if self.fine_tuned.is_file() else self.shipped

    def sync(self, network: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        """Loads the current file into ``network`` unless it holds it already (shipped weights at first)."""
        with self._lock:
            path = self.current()
            signature = _signature(path)
            if self._loaded.get(id(network), _signature(self.shipped)) != signature:  # built with the shipped file
                network.load_state_dict(torch.load(path, map_location=device, weights_only=True))
                self._loaded[id(network)] = signature

    def install(self, trained: Path) -> None:
        """Makes ``trained`` the served weights (copied, then renamed into place: never half written)."""
        self.fine_tuned.parent.mkdir(parents=True, exist_ok=True)
        partial = self.fine_tuned.with_name(self.fine_tuned.name + ".partial")
        shutil.copyfile(trained, partial)
        os.replace(partial, self.fine_tuned)

    def restore(self) -> bool:
        """Serves the shipped weights again; returns whether fine-tuned weights were removed."""
        if not self.fine_tuned.is_file():
            return False
        self.fine_tuned.unlink()
        return True

    def describe(self) -> dict[str, Any]:
        """Which weights are served: ``fine-tuned`` or ``shipped``, the file name and its SHA-256 (first 16 digits)."""
        path = self.current()
        signature = _signature(path)
        if signature not in self._digests:
            self._digests[signature] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        kind = "fine-tuned" if path == self.fine_tuned else "shipped"
        return {"weights": kind, "file": path.name, "sha256": self._digests[signature]}


def _signature(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size
