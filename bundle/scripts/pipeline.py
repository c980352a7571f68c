"""Native scan in -> lesion label map on the same grid out: registration, MoME inference, inverse mapping.

:class:`MoMESegmenter` builds the network, weights and inferer from the bundle's own ``configs/inference.json`` (so a
converted release bundle and the demo bundle behave the same) and runs the steps of ``native.py`` around them. It is
what ``mome-seg`` and the Deploy application's inference operator call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import NormalizeIntensity

from .intensity import normalise_intensity
from .metrics import voxel_ml
from .native import probabilities_to_native, to_mome_space
from .networks import MoMEPlus
from .registration import (
    CoRegistration,
    Registration,
    RegistrationSettings,
    coregister,
    register_to_template,
    validate_volume,
)
from .transforms import ReverseSpatialAxes

__all__ = ["MoMEPlusSegmenter", "MoMESegmenter", "NativeSegmentation", "PlusChannel", "PlusSegmentation"]

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

    ``CONFIG`` / ``WEIGHTS`` name the bundle's inference config and weights (``MoMEPlusSegmenter`` uses the MoME+
    ones).

    Args:
        bundle_dir: bundle root (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        device: torch device; default the bundle's (CUDA when available).
        tta: mirror test-time augmentation (the bundle's ``tta`` switch).
        profile: inference profile (``parity``, ``fast``, ``accurate``; see ``scripts.profiles``); default the
            bundle's ``profile`` id.
        registration: registration parameters.
    """

    CONFIG = "inference.json"
    WEIGHTS = "model.pt"
    PLUS = False

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
        config = self.bundle_dir / "configs" / self.CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"{config}: not found; the bundle has no {'MoME+' if self.PLUS else 'MoME'} model.")
        parser.read_config(str(config))
        parser.read_meta(str(self.bundle_dir / "configs" / "metadata.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["tta"] = bool(tta)
        if profile is not None:
            parser["profile"] = profile
        if device is not None:
            parser["device"] = f"$torch.device('{torch.device(device)}')"
        self.metadata = {"name": parser.get("_meta_#name"), "version": parser.get("_meta_#version")}
        formats = ["_meta_#mome_plus#network_data_format", "_meta_#network_data_format"][0 if self.PLUS else 1 :]
        channel_defs = [parser.get(f"{key}#outputs#pred#channel_def") for key in formats]
        self.channel_def = {
            str(k): str(v) for k, v in next((c for c in channel_defs if c), {"0": "background", "1": "lesion"}).items()
        }
        spacing = [float(s) for s in parser.get("spacing", [1.0, 1.0, 1.0])]
        if max(spacing) - min(spacing) > 1e-6:
            raise ValueError(f"{self.bundle_dir}: MoME space needs an isotropic spacing, the bundle has {spacing}.")
        self.spacing = spacing[0]
        self.device = parser.get_parsed_content("device")
        self.network = parser.get_parsed_content("network_def").to(self.device)
        if isinstance(self.network, MoMEPlus) != self.PLUS:
            kind = "a MoME+" if isinstance(self.network, MoMEPlus) else "a single-modality MoME"
            raise ValueError(f"{config}: describes {kind} model, which this segmenter cannot run.")
        self.modalities = [str(m) for m in parser.get("modalities", [])]
        self.patch_size = [int(n) for n in parser.get("patch_size", [64, 64, 64])]
        weights = self.bundle_dir / "models" / self.WEIGHTS
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
        logits = self.inferer(self._network_input(mome_image)[None].to(self.device), self.network)[0]
        return ReverseSpatialAxes()(torch.softmax(torch.as_tensor(logits).float(), dim=0).cpu())

    def _network_input(self, mome_image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A MoME-space (X, Y, Z) image as the network takes it: (1, ...) in its axis order, z-scored."""
        return self.normalize(ReverseSpatialAxes()(torch.as_tensor(mome_image, dtype=torch.float32)[None]))

    def _to_mome_space(
        self, array: np.ndarray, affine: np.ndarray, modality: str | None, name: str, say: Progress
    ) -> tuple[torch.Tensor, np.ndarray, Registration, Dict[str, float]]:
        """Checks, normalises and registers a native volume and resamples it into brain-masked MoME space.

        Returns:
            The MoME-space image and its affine, the registration and the seconds of both steps.
        """
        validate_volume(array, affine, name)
        array = normalise_intensity(array)
        started = time.perf_counter()
        say("registering to the MNI152 2009a template")
        registration = register_to_template(array, affine, self.registration_settings, modality, name)
        seconds = {"registration": time.perf_counter() - started}
        started = time.perf_counter()
        mome, mome_affine = to_mome_space(array, affine, registration.native_to_template, self.spacing)
        seconds["to_mome_space"] = time.perf_counter() - started
        return mome, mome_affine, registration, seconds

    def segment(
        self,
        array: np.ndarray,
        affine: np.ndarray,
        name: str = "image",
        modality: str | None = None,
        progress: Progress | None = None,
    ) -> NativeSegmentation:
        """Registers, segments and maps back one native (X, Y, Z) volume with its RAS ``affine``.

        ``modality`` only chooses the registration template's contrast; MoME itself needs no modality label. The
        intensities are normalised first (:func:`scripts.intensity.normalise_intensity`), so the stored offset and
        scale do not matter.

        Raises:
            VolumeRejected: a volume that cannot be segmented, or whose registration fails its quality checks
                (:class:`scripts.registration.RegistrationFailed`); the message names ``name``.
        """
        say = progress or (lambda _: None)
        mome, mome_affine, registration, seconds = self._to_mome_space(array, affine, modality, name, say)

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

    def training_case(
        self, array: np.ndarray, affine: np.ndarray, labels: np.ndarray, modality: str, name: str = "image"
    ) -> Dict[str, Any]:
        """A labelled native volume as a training case in the network's space, prepared exactly as :meth:`segment`
        prepares its input: intensity normalisation, registration to the template, resampling into brain-masked MoME
        space, the network's axis order and z-score. The label (any value > 0 is lesion) follows the same transform.

        Returns:
            ``image`` and ``label`` (1, X, Y, Z) tensors, ``modality``, ``case`` (``name``) and the registration record
            (the case format of :class:`scripts.training.Trainer`).

        Raises:
            VolumeRejected: the volume cannot be segmented, or its registration fails its quality checks.
            ValueError: the labels are not on the volume's grid.
        """
        if labels.shape != array.shape:
            raise ValueError(f"{name}: label shape {labels.shape} differs from the image's {array.shape}.")
        image, _, registration, _ = self._to_mome_space(array, affine, modality, name, lambda _: None)
        mask, _ = to_mome_space((labels > 0).astype(np.float32), affine, registration.native_to_template, self.spacing)
        return {
            "image": self._network_input(image),
            "label": ReverseSpatialAxes()((mask > 0.5).float()[None]),
            "modality": modality,
            "case": name,
            "registration": registration.to_dict(),
        }

    @torch.inference_mode()
    def expert_disagreement(
        self, array: np.ndarray, affine: np.ndarray, modality: str | None = None, name: str = "image"
    ) -> Dict[str, Any]:
        """How much the experts disagree on a native volume (MONAI Label's active learning): each expert's lesion
        probability in MoME space (input prepared as :meth:`segment` prepares it, tiled by the bundle's inferer), and
        the mean over brain voxels of the spread ``max_k p_k - min_k p_k`` (0: all agree, 1: the most possible).

        Raises:
            VolumeRejected: the volume cannot be segmented, or its registration fails its quality checks.
        """
        mome, mome_affine, _, _ = self._to_mome_space(array, affine, modality, name, lambda _: None)
        image = self._network_input(mome)[None].to(self.device)
        foreground = self.inferer(image, _ExpertForeground(self.network))[0].cpu()
        brain = ReverseSpatialAxes()(mome[None] != 0)[0]
        spread = foreground.max(0).values - foreground.min(0).values
        ml = voxel_ml(mome_affine)
        lesion_ml = {m: round(float((p[brain] > 0.5).sum()) * ml, 3) for m, p in zip(self.modalities, foreground)}
        return {"score": round(float(spread[brain].mean()), 6), "expert_lesion_ml": lesion_ml}

    def inference_record(self) -> Dict[str, Any]:
        """The inference profile and what the last network run did (tiles, precision, fallbacks, threads)."""
        describe = getattr(self.inferer, "describe", None)
        record = describe() if callable(describe) else {"inferer": type(self.inferer).__name__}
        return {**record, "device": str(self.device), "threads": torch.get_num_threads()}

    def describe(self) -> Dict[str, Any]:
        """Model name, version, bundle path and spacing for reports."""
        return {**self.metadata, "bundle": str(self.bundle_dir.resolve()), "spacing_mm": self.spacing}


@dataclass
class PlusChannel:
    """One co-registrable series of a study, as MoME+ input: the native volume and its scanner frame."""

    array: np.ndarray  # (X, Y, Z)
    affine: np.ndarray  # RAS mm
    frame_of_reference: str | None = None  # DICOM FrameOfReferenceUID (None: unknown, registered)
    name: str = "image"


@dataclass
class PlusSegmentation(NativeSegmentation):
    """A MoME+ run: labels on the reference series grid, plus how every channel was aligned with it."""

    reference: str = ""
    availability: Dict[str, bool] = field(default_factory=dict)
    channel_def: Dict[str, str] = field(default_factory=dict)  # label value -> class name
    excluded: Dict[str, str] = field(default_factory=dict)  # modality -> why it was left out (misaligned)
    coregistration: Dict[str, CoRegistration] = field(default_factory=dict)


class MoMEPlusSegmenter(MoMESegmenter):
    """A bundle's MoME+ model (``configs/inference_plus.json``, ``models/model_plus.pt``) for native studies.

    The series given (any non-empty subset of the model's modalities, e.g. T1, T1ce, T2, FLAIR) are aligned with
    the reference series (same frame of reference: their affines already agree; otherwise rigid registration),
    the reference is registered to the template, every series is resampled once, directly from its own grid, into
    MoME space, MoME+ runs with the availability vector, and the labels are mapped back onto the reference grid. A
    series whose similarity to the reference stays low after alignment (a co-registration warning) is left out, as
    if missing, rather than feeding misaligned anatomy to the network; the result records why.
    """

    CONFIG = "inference_plus.json"
    WEIGHTS = "model_plus.pt"
    PLUS = True

    @torch.inference_mode()
    def probabilities_plus(self, mome_channels: np.ndarray, availability: Sequence[float]) -> torch.Tensor:
        """Class probabilities (C, X, Y, Z) for MoME-space channels (M, X, Y, Z), missing channels zero."""
        reverse = ReverseSpatialAxes()
        image = self.normalize(reverse(torch.as_tensor(mome_channels, dtype=torch.float32)))
        c = torch.tensor([list(availability)], dtype=torch.float32, device=self.device)
        logits = self.inferer(image[None].to(self.device), self.network, availability=c)[0]
        return reverse(torch.softmax(torch.as_tensor(logits).float(), dim=0).cpu())

    def segment_channels(
        self, channels: Mapping[str, PlusChannel], reference: str, progress: Progress | None = None
    ) -> PlusSegmentation:
        """Segments one study given as ``{modality: PlusChannel}``; labels come out on ``channels[reference]``'s grid.

        Raises:
            ValueError: a modality the model does not know, no channel, or the reference not among the channels.
            VolumeRejected: a volume that cannot be registered (named).
        """
        say = progress or (lambda _: None)
        unknown = sorted(set(channels) - set(self.modalities))
        if unknown or not channels or reference not in channels:
            raise ValueError(
                f"MoME+ channels {sorted(channels)} (reference {reference!r}) must be a non-empty subset of "
                f"{self.modalities} including the reference."
            )
        for channel in channels.values():
            validate_volume(channel.array, channel.affine, channel.name)
        channels = {
            m: PlusChannel(normalise_intensity(c.array), c.affine, c.frame_of_reference, c.name)
            for m, c in channels.items()
        }
        ref = channels[reference]
        seconds: Dict[str, float] = {}
        started = time.perf_counter()
        say(f"registering the reference series ({reference}) to the MNI152 2009a template")
        registration = register_to_template(ref.array, ref.affine, self.registration_settings, reference, ref.name)
        seconds["registration"] = time.perf_counter() - started

        started = time.perf_counter()
        aligned: Dict[str, CoRegistration] = {}
        for modality, channel in channels.items():
            if modality == reference:
                continue
            say(f"aligning {modality} with {reference}")
            same = channel.frame_of_reference is not None and channel.frame_of_reference == ref.frame_of_reference
            aligned[modality] = coregister(
                channel.array, channel.affine, ref.array, ref.affine, same, self.registration_settings,
                modality=modality, reference_registration=registration,
            )  # fmt: skip
        seconds["coregistration"] = time.perf_counter() - started
        excluded = {m: "; ".join(c.warnings) for m, c in aligned.items() if c.warnings}
        for modality, reason in excluded.items():
            say(f"leaving {modality} out of MoME+: {reason}")
        channels = {m: c for m, c in channels.items() if m not in excluded}

        started = time.perf_counter()
        mome_channels, mome_affine = self._mome_channels(channels, aligned, registration.native_to_template)
        seconds["to_mome_space"] = time.perf_counter() - started

        started = time.perf_counter()
        say("running MoME+ on " + ", ".join(m for m in self.modalities if m in channels))
        availability = [1.0 if m in channels else 0.0 for m in self.modalities]
        probabilities = self.probabilities_plus(mome_channels, availability)
        seconds["network"] = time.perf_counter() - started

        started = time.perf_counter()
        say("mapping the segmentation back to the reference series grid")
        labels = probabilities_to_native(
            probabilities, self.spacing, ref.array.shape, ref.affine, registration.native_to_template
        )
        seconds["to_native"] = time.perf_counter() - started
        return PlusSegmentation(
            labels=labels,
            registration=registration,
            mome_image=mome_channels,
            mome_labels=probabilities.argmax(0).to(torch.uint8).numpy(),
            mome_affine=mome_affine,
            seconds=seconds,
            inference=self.inference_record(),
            reference=reference,
            availability={m: m in channels for m in self.modalities},
            channel_def=dict(self.channel_def),
            excluded=excluded,
            coregistration=aligned,
        )

    def _mome_channels(
        self, channels: Mapping[str, PlusChannel], aligned: Mapping[str, CoRegistration], ref_to_template: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every channel resampled once from its own grid into MoME space, in the model's order (missing: zero)."""
        stacked, mome_affine = [], None
        for modality in self.modalities:
            channel = channels.get(modality)
            if channel is None:
                stacked.append(None)
                continue
            to_template = (
                ref_to_template if modality not in aligned else ref_to_template @ aligned[modality].moving_to_reference
            )
            mome, mome_affine = to_mome_space(channel.array, channel.affine, to_template, self.spacing)
            stacked.append(mome.numpy())
        shape = next(c.shape for c in stacked if c is not None)
        arrays = [np.zeros(shape, np.float32) if c is None else c.astype(np.float32) for c in stacked]
        return np.stack(arrays), mome_affine


class _ExpertForeground(torch.nn.Module):
    """A MoME seen by the tiled inferer as a network whose output is :meth:`scripts.networks.MoME.expert_foreground`."""

    def __init__(self, mome: torch.nn.Module) -> None:
        super().__init__()
        self.mome = mome
        self.gate = mome.gate  # the inferer sizes its tiles by the widest input, the gate's

    @property
    def size_divisor(self) -> tuple[int, int, int]:
        return self.mome.size_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mome.expert_foreground(x)
