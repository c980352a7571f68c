"""Locating the MoME bundle and making its ``scripts`` package importable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["BUNDLE_ENV", "default_bundle_dir", "use_bundle_scripts"]

BUNDLE_ENV = "MOME_BUNDLE"


def default_bundle_dir() -> Path:
    """``$MOME_BUNDLE`` if set, else the ``bundle/`` folder next to this package (source checkout)."""
    configured = os.environ.get(BUNDLE_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "bundle"


def use_bundle_scripts(bundle_dir: Path | None = None) -> Path:
    """Puts a bundle root on ``sys.path`` (as MONAI does) so ``import scripts`` resolves to its code."""
    root = (bundle_dir or default_bundle_dir()).resolve()
    if not (root / "scripts" / "__init__.py").is_file():
        raise FileNotFoundError(f"{root}: not a MoME bundle (no scripts/__init__.py); set ${BUNDLE_ENV}.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
