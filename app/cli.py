"""Console-script entry points (thin wrappers over the bundle's Python API)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from app.bundle_path import use_bundle_scripts

__all__ = ["convert_main"]


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``mome-convert SRC --out BUNDLE_DIR``: the authors' checkpoint folder -> runnable bundle."""
    use_bundle_scripts()
    from scripts.convert_upstream import main

    return main(sys.argv[1:] if argv is None else argv)
