"""The operators' one gateway to a MoME bundle: locate it, import its ``scripts``, list and load the models it holds.

A MoME bundle is a MONAI Bundle folder (``configs/``, ``scripts/``, ``models/``) whose ``scripts`` package holds the
network, the native-space pipeline and the metrics. As MONAI does, the bundle root is put on ``sys.path`` so that
``import scripts`` resolves to its code; the first bundle put there is the one whose code runs in this process.
No other module of ``operators`` imports ``scripts``: what they need from the bundle goes through the functions here.

Which models a bundle holds (:func:`installed_models`) and which of them a run uses (:func:`choose_models`) are
decided here, once, for every entry point.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from operators.study import Mode, PlusSegmenter, Segmenter

__all__ = [
    "BUNDLE_ENV",
    "InstalledModels",
    "Models",
    "bundle_scripts",
    "choose_models",
    "default_bundle_dir",
    "installed_models",
    "lesion_components",
    "lesion_summary",
    "load_segmenters",
    "plus_channel",
    "profile_names",
    "region_volumes",
    "rejections",
    "resolve_bundle",
    "use_bundle_scripts",
    "validate_volume",
    "voxel_ml",
]

BUNDLE_ENV = "MOME_BUNDLE"
logger = logging.getLogger(__name__)


def default_bundle_dir() -> Path:
    """``$MOME_BUNDLE`` if set, else the ``bundle/`` folder next to this package (a source checkout or an install).

    The MAP names its bundle with ``HOLOSCAN_MODEL_PATH`` instead (see :func:`resolve_bundle`)."""
    configured = os.environ.get(BUNDLE_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "bundle"


def use_bundle_scripts(bundle_dir: Path | None = None) -> Path:
    """Puts a bundle root on ``sys.path`` (as MONAI does) so ``import scripts`` resolves to its code; returns it.

    Raises:
        FileNotFoundError: the folder holds no ``scripts/__init__.py``.
    """
    root = Path(bundle_dir or default_bundle_dir()).resolve()
    if not (root / "scripts" / "__init__.py").is_file():
        raise FileNotFoundError(f"{root}: not a MoME bundle (no scripts/__init__.py); set ${BUNDLE_ENV}.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def resolve_bundle(model_path: Path | None) -> Path:
    """The MoME bundle folder for ``-m`` / ``HOLOSCAN_MODEL_PATH`` / ``--model``.

    A bundle folder itself, a folder holding exactly one bundle (the MAP's ``models/<name>/``), or, when the path is
    None or does not exist (the SDK's default ``models``), the bundle installed with the application.

    Raises:
        FileNotFoundError: the path exists but holds no (or more than one) MoME bundle.
    """
    if model_path is None or not Path(model_path).exists():
        return default_bundle_dir().resolve()
    path = Path(model_path).resolve()
    if (path / "configs" / "inference.json").is_file():
        return path
    children = sorted(path.iterdir()) if path.is_dir() else []
    candidates = [child for child in children if (child / "configs" / "inference.json").is_file()]
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{path}: not a MoME bundle folder (configs/inference.json) nor a folder holding exactly one "
            f"({len(candidates)} found)."
        )
    return candidates[0]


def bundle_scripts(module: str) -> ModuleType:
    """The bundle's ``scripts.<module>``: of the bundle already on ``sys.path``, else of :func:`default_bundle_dir`."""
    if "scripts" not in sys.modules and importlib.util.find_spec("scripts") is None:
        use_bundle_scripts()
    return importlib.import_module(f"scripts.{module}")


@dataclass(frozen=True)
class InstalledModels:
    """Which models a bundle can run."""

    single: bool  # configs/inference.json is a MoME and models/model.pt exists
    plus: bool  # configs/inference_plus.json is a MoMEPlus and models/model_plus.pt exists


@dataclass(frozen=True)
class Models:
    """The models a run uses, loaded: either may be None (see :func:`choose_models`)."""

    single: Segmenter | None
    plus: PlusSegmenter | None

    def describe(self) -> dict[str, Any]:
        """The single-contrast model's description (else MoME+'s), as recorded in reports."""
        return (self.single or self.plus).describe()  # type: ignore[union-attr]


def _network_target(config: Path) -> str:
    try:
        return str(json.loads(config.read_text()).get("network_def", {}).get("_target_", ""))
    except (OSError, ValueError):
        return ""


def installed_models(bundle_dir: Path) -> InstalledModels:
    """Which models a bundle holds: a MoME (``models/model.pt``) and a MoME+ (``models/model_plus.pt``)."""
    bundle_dir = Path(bundle_dir)
    single = bundle_dir / "configs" / "inference.json"
    plus = bundle_dir / "configs" / "inference_plus.json"
    return InstalledModels(
        single=(bundle_dir / "models" / "model.pt").is_file() and not _network_target(single).endswith("MoMEPlus"),
        plus=(bundle_dir / "models" / "model_plus.pt").is_file() and _network_target(plus).endswith("MoMEPlus"),
    )


def choose_models(bundle_dir: Path, mode: Mode) -> InstalledModels:
    """Which of the bundle's models a run in ``mode`` (``auto``, ``single``, ``plus``) uses.

    ``single`` uses MoME only; ``plus`` and ``auto`` use MoME+ when installed, and MoME for the series MoME+ cannot
    take (DWI) when installed.

    Raises:
        FileNotFoundError: ``mode`` needs a model the bundle does not hold, or it holds none.
    """
    models = installed_models(bundle_dir)
    if mode == "plus" and not models.plus:
        raise FileNotFoundError(
            f"{bundle_dir}: --mode plus needs a MoME+ model (models/model_plus.pt); none installed."
        )
    if mode == "single" and not models.single:
        raise FileNotFoundError(
            f"{bundle_dir}: no MoME model (models/model.pt); single-contrast segmentation (NIfTI input, --mode single) "
            "needs one."
        )
    if not (models.single or models.plus):
        raise FileNotFoundError(f"{bundle_dir}: the bundle has no weights (models/model.pt or models/model_plus.pt).")
    return InstalledModels(single=models.single, plus=models.plus and mode != "single")


def load_segmenters(
    bundle_dir: Path, mode: Mode = "auto", device: str | None = None, tta: bool = False, profile: str | None = None
) -> Models:
    """Loads the models :func:`choose_models` picks, with the bundle's own code (``scripts.pipeline``)."""
    chosen = choose_models(bundle_dir, mode)
    use_bundle_scripts(bundle_dir)
    pipeline = bundle_scripts("pipeline")
    options = {"device": device, "tta": tta, "profile": profile}
    names = [name for name, used in (("MoME", chosen.single), ("MoME+", chosen.plus)) if used]
    logger.info("loading %s from %s", " and ".join(names), bundle_dir)
    return Models(
        single=pipeline.MoMESegmenter(bundle_dir, **options) if chosen.single else None,
        plus=pipeline.MoMEPlusSegmenter(bundle_dir, **options) if chosen.plus else None,
    )


def profile_names() -> tuple[str, ...]:
    """The inference profiles the bundle's code offers (``scripts.profiles.PROFILES``)."""
    return tuple(bundle_scripts("profiles").PROFILES)


def rejections() -> tuple[type[Exception], ...]:
    """The bundle's errors that reject one volume: a volume or registration that fails its checks
    (``scripts.registration.VolumeRejected``)."""
    return (bundle_scripts("registration").VolumeRejected,)


def validate_volume(array: np.ndarray, affine: np.ndarray, name: str) -> None:
    """The bundle's checks of a volume before registration (raises its ``VolumeRejected``)."""
    bundle_scripts("registration").validate_volume(array, affine, name)


def plus_channel(array: np.ndarray, affine: np.ndarray, frame_of_reference: str | None, name: str) -> Any:
    """One MoME+ input channel (``scripts.pipeline.PlusChannel``)."""
    return bundle_scripts("pipeline").PlusChannel(array, affine, frame_of_reference, name)


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in mL (``scripts.metrics.voxel_ml``)."""
    return float(bundle_scripts("metrics").voxel_ml(affine))


def lesion_summary(labels: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Lesion volume (mL), count and largest lesion of a label map (``scripts.metrics.lesion_summary``)."""
    return bundle_scripts("metrics").lesion_summary(labels, voxel_ml(affine))


def region_volumes(labels: np.ndarray, affine: np.ndarray, values: Mapping[str, int]) -> dict[str, float]:
    """The volume (mL, 3 decimals) of each named label value of a label map (MoME+ sub-regions)."""
    ml = voxel_ml(affine)
    return {name: round(float((labels == value).sum()) * ml, 3) for name, value in values.items()}


def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected lesion components and their count (``scripts.metrics.connected_components``)."""
    return bundle_scripts("metrics").connected_components(mask)
