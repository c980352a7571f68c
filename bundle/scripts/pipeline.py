"""Native scan in -> lesion label map on the same grid out: registration, MoME inference, inverse mapping.

:class:`MoMESegmenter` builds the network, weights and inferer from the bundle's own ``configs/inference.json`` (so a
converted release bundle and the demo bundle behave the same) and runs the steps of ``native.py`` around them. It is
what ``mome-seg`` and the Deploy application's inference operator call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import NormalizeIntensity

from .native import probabilities_to_native, to_mome_space
from .registration import Registration, RegistrationSettings, register_to_template, validate_volume
from .transforms import ReverseSpatialAxes

__all__ = ["MoMESegmenter", "NativeSegmentation"]

Progress = Callable[[str], None]


@dataclass
class NativeSegmentation:
    """Everything one native-space run produces."""

    labels: np.ndarray  # uint8 on the native grid
    registration: Registration
    mome_image: np.ndarray  # registered, brain-masked image on the MoME grid (before the z-score)
    mome_labels: np.ndarray  # argmax on the MoME grid
    mome_affine: np.ndarray
    seconds: Dict[str, float] = field(default_factory=dict)
    inference: Dict[str, Any] = field(default_factory=dict)  # profile and what the inferer did


class MoMESegmenter:
    """A MoME bundle ready to segment native-space volumes.

    Args:
        bundle_dir: bundle root (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        device: torch device; default the bundle's (CUDA when available).
        tta: mirror test-time augmentation (the bundle's ``tta`` switch).
        profile: inference profile (``parity``, ``fast``, ``accurate``; see ``scripts.profiles``); default the
            bundle's ``profile`` id.
        registration: registration parameters.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device | None = None,
        tta: bool = False,
        registration: RegistrationSettings | None = None,
        profile: str | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser.read_meta(str(self.bundle_dir / "configs" / "metadata.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["tta"] = bool(tta)
        if profile is not None:
            parser["profile"] = profile
        if device is not None:
            parser["device"] = f"$torch.device('{torch.device(device)}')"
        self.metadata = {"name": parser.get("_meta_#name"), "version": parser.get("_meta_#version")}
        spacing = [float(s) for s in parser.get("spacing", [1.0, 1.0, 1.0])]
        if max(spacing) - min(spacing) > 1e-6:
            raise ValueError(f"{self.bundle_dir}: MoME space needs an isotropic spacing, the bundle has {spacing}.")
        self.spacing = spacing[0]
        self.device = parser.get_parsed_content("device")
        self.network = parser.get_parsed_content("network_def").to(self.device)
        weights = self.bundle_dir / "models" / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: the bundle has no weights (train, or convert with mome-convert).")
        self.network.load_state_dict(torch.load(weights, map_location=self.device, weights_only=True))
        self.network.eval()
        self.inferer = parser.get_parsed_content("inferer")
        self.normalize = NormalizeIntensity(nonzero=bool(parser.get("normalize_nonzero", False)), channel_wise=True)
        self.registration_settings = registration

    @torch.inference_mode()
    def probabilities(self, mome_image: np.ndarray) -> torch.Tensor:
        """Class probabilities (C, X, Y, Z) of a brain-masked MoME-space image (z-scored here, as the bundle does)."""
        reverse = ReverseSpatialAxes()
        image = self.normalize(reverse(torch.as_tensor(mome_image, dtype=torch.float32)[None]))
        logits = self.inferer(image[None].to(self.device), self.network)[0]
        return reverse(torch.softmax(torch.as_tensor(logits).float(), dim=0).cpu())

    def segment(
        self,
        array: np.ndarray,
        affine: np.ndarray,
        name: str = "image",
        modality: str | None = None,
        progress: Progress | None = None,
    ) -> NativeSegmentation:
        """Registers, segments and maps back one native (X, Y, Z) volume with its RAS ``affine``.

        ``modality`` only chooses the registration template's contrast; MoME itself needs no modality label.
        """
        say = progress or (lambda _: None)
        validate_volume(array, affine, name)
        seconds: Dict[str, float] = {}
        started = time.perf_counter()
        say("registering to the MNI152 2009a template")
        registration = register_to_template(array, affine, self.registration_settings, modality)
        seconds["registration"] = time.perf_counter() - started

        started = time.perf_counter()
        mome, mome_affine = to_mome_space(array, affine, registration.native_to_template, self.spacing)
        seconds["to_mome_space"] = time.perf_counter() - started

        started = time.perf_counter()
        say("running MoME")
        probabilities = self.probabilities(mome.numpy())
        seconds["network"] = time.perf_counter() - started

        started = time.perf_counter()
        say("mapping the segmentation back to the scan grid")
        labels = probabilities_to_native(
            probabilities, self.spacing, array.shape, affine, registration.native_to_template
        )
        seconds["to_native"] = time.perf_counter() - started
        return NativeSegmentation(
            labels=labels,
            registration=registration,
            mome_image=mome.numpy(),
            mome_labels=probabilities.argmax(0).to(torch.uint8).numpy(),
            mome_affine=mome_affine,
            seconds=seconds,
            inference=self.inference_record(),
        )

    def inference_record(self) -> Dict[str, Any]:
        """The inference profile and what the last network run did (tiles, precision, fallbacks, threads)."""
        describe = getattr(self.inferer, "describe", None)
        record = describe() if callable(describe) else {"inferer": type(self.inferer).__name__}
        return {**record, "device": str(self.device), "threads": torch.get_num_threads()}

    def describe(self) -> Dict[str, Any]:
        """Model name, version, bundle path and spacing for reports."""
        return {**self.metadata, "bundle": str(self.bundle_dir.resolve()), "spacing_mm": self.spacing}
