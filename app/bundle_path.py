"""Locating the MoME bundle and making its ``scripts`` package importable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["BUNDLE_ENV", "default_bundle_dir", "installed_models", "use_bundle_scripts"]

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


def _network_target(config: Path) -> str:
    try:
        return str(json.loads(config.read_text()).get("network_def", {}).get("_target_", ""))
    except (OSError, ValueError):
        return ""


def installed_models(bundle_dir: Path) -> dict[str, bool]:
    """Which models a bundle can run: ``single`` (``configs/inference.json`` is a MoME with ``models/model.pt``) and
    ``plus`` (``configs/inference_plus.json`` with ``models/model_plus.pt``)."""
    bundle_dir = Path(bundle_dir)
    single = bundle_dir / "configs" / "inference.json"
    plus = bundle_dir / "configs" / "inference_plus.json"
    return {
        "single": (bundle_dir / "models" / "model.pt").is_file() and not _network_target(single).endswith("MoMEPlus"),
        "plus": (bundle_dir / "models" / "model_plus.pt").is_file() and _network_target(plus).endswith("MoMEPlus"),
    }
