"""Reading the MoME authors' nnU-Net v2 checkpoints safely and mapping them onto :mod:`scripts.networks`.

The authors' ``MoME_CHECKPOINT`` folder holds ``checkpoint_best.pth`` (the gate) and ``checkpoint_best{k}.pth``
(expert k, in the order T1, T1ce, T2, FLAIR, DWI). Each file is a pickled nnU-Net training checkpoint whose
``init_args`` carry the full nnU-Net plans and dataset.json; everything about the architecture and the data
conventions is read from there, never assumed.

Security: the pickles are opened with ``torch.load(weights_only=True)`` and an explicit allow-list of the few
non-tensor globals nnU-Net writes (numpy scalars and dtypes). Anything else is refused with an error naming it.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .networks import MODALITIES, PLUS_MODALITIES

__all__ = [
    "GATE_FILE",
    "MOMEPLUS_DISPATCH_FILE",
    "MOMEPLUS_MODALITIES",
    "MOME_MODALITIES",
    "ArchitectureSpec",
    "CheckpointError",
    "UntrustedCheckpointError",
    "UpstreamMoME",
    "architecture_from_plans",
    "expert_file",
    "load_checkpoint",
    "map_unet_state_dict",
    "read_mome_checkpoints",
    "sha256_of",
]

logger = logging.getLogger(__name__)

GATE_FILE = "checkpoint_best.pth"
MOME_MODALITIES = MODALITIES  # the authors' expert order, defined once in scripts.networks
MOMEPLUS_MODALITIES = PLUS_MODALITIES
MOMEPLUS_DISPATCH_FILE = "checkpoint_best_dispatch.pth"
MOME, MOME_PLUS = "mome", "mome_plus"
_SUPPORTED_NORMALIZATION = {"ZScoreNormalization"}


class CheckpointError(ValueError):
    """An upstream checkpoint (set) is missing, malformed, inconsistent or not a MoME checkpoint."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint pickle references a Python global outside the allow-list; it is not unpickled."""


def expert_file(index: int) -> str:
    """File name of expert ``index`` (0-based) in the authors' layout: ``checkpoint_best{index + 1}.pth``."""
    return f"checkpoint_best{index + 1}.pth"


def _numpy_allow_list() -> list[Any]:
    """Globals that nnU-Net checkpoints legitimately contain besides tensors (``_best_ema`` is a numpy scalar)."""
    allowed: list[Any] = [np.dtype]
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtype_classes = ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType")
    allowed += [getattr(np.dtypes, name) for name in dtype_classes if hasattr(np, "dtypes")]
    return allowed


def load_checkpoint(path: Path, require_plans: bool = True) -> dict[str, Any]:
    """Loads one nnU-Net checkpoint with ``weights_only=True`` and the numpy allow-list.

    ``require_plans=False`` accepts a checkpoint without ``init_args`` (MoME+'s dispatch file holds only
    ``network_weights`` and ``inference_allowed_mirroring_axes``).

    Raises:
        CheckpointError: the file is missing or unreadable, or not an nnU-Net training checkpoint.
        UntrustedCheckpointError: the pickle needs a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (not a torch.save zip archive).")
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (?:global: GLOBAL (\S+)|class (\S+)|operand (\d+))", str(err))
        if found is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err}).") from err
        what = f"the global {found.group(1) or found.group(2)}" if found.group(3) is None else "a pickle opcode"
        raise UntrustedCheckpointError(
            f"{path}: refused to unpickle {what}, which is not on the allow-list of an nnU-Net checkpoint "
            "(tensors, numpy scalars/dtypes, torch.device). The file may be tampered with or is not a MoME "
            "checkpoint; it was not loaded."
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err}).") from err
    if not isinstance(checkpoint, Mapping) or "network_weights" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not an nnU-Net training checkpoint (no 'network_weights'; found {keys}).")
    init_args = checkpoint.get("init_args")
    if require_plans and (not isinstance(init_args, Mapping) or not isinstance(init_args.get("plans"), Mapping)):
        raise CheckpointError(f"{path}: checkpoint has no init_args['plans']; cannot read the architecture.")
    return dict(checkpoint)


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything needed to rebuild the networks and their data conventions from nnU-Net plans."""

    features_per_stage: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    n_conv_per_stage: list[int]
    n_conv_per_stage_decoder: list[int]
    patch_size: list[int]
    spacing: list[float]
    normalization: str
    use_mask_for_norm: bool
    labels: dict[str, int]
    channel_names: dict[str, str]
    configuration: str
    plans_name: str = ""
    dataset_name: str = ""
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    def topology(self) -> dict[str, Any]:
        """Keyword arguments shared by :class:`scripts.networks.PlainConvUNet` and :class:`~scripts.networks.MoME`."""
        return {
            "features_per_stage": self.features_per_stage,
            "kernel_sizes": self.kernel_sizes,
            "strides": self.strides,
            "n_conv_per_stage": self.n_conv_per_stage,
            "n_conv_per_stage_decoder": self.n_conv_per_stage_decoder,
        }


def _resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A plans configuration with nnU-Net's ``inherits_from`` chain applied."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise CheckpointError(f"plans have no configuration {name!r} (found {sorted(configurations)}).")
    config = dict(configurations[name])
    parent = config.pop("inherits_from", None)
    if parent is None:
        return config
    if parent == name:
        raise CheckpointError(f"plans configuration {name!r} inherits from itself.")
    return {**_resolve_configuration(plans, parent), **config}


def _triples(values: Sequence[Any], what: str) -> list[list[int]]:
    out = []
    for value in values:
        triple = [int(value)] * 3 if isinstance(value, (int, np.integer)) else [int(v) for v in value]
        if len(triple) != 3:
            raise CheckpointError(f"{what}: only 3-D networks are supported, got {list(values)}.")
        out.append(triple)
    return out


def _topology_from_configuration(config: Mapping[str, Any]) -> dict[str, Any]:
    """U-Net topology from either the nnU-Net <= 2.3 keys or the >= 2.4 ``architecture.arch_kwargs`` block."""
    if "architecture" in config:
        arch = config["architecture"]
        class_name = str(arch.get("network_class_name", "")).rsplit(".", 1)[-1]
        kwargs = arch.get("arch_kwargs", {})
        features = [int(f) for f in kwargs["features_per_stage"]]
        kernels, strides = kwargs["kernel_sizes"], kwargs["strides"]
        n_enc, n_dec = kwargs["n_conv_per_stage"], kwargs["n_conv_per_stage_decoder"]
    else:
        class_name = str(config.get("UNet_class_name", "PlainConvUNet"))
        kernels, strides = config["conv_kernel_sizes"], config["pool_op_kernel_sizes"]
        n_stages = len(kernels)
        base, cap = int(config["UNet_base_num_features"]), int(config["unet_max_num_features"])
        features = [min(base * 2**stage, cap) for stage in range(n_stages)]
        n_enc, n_dec = config["n_conv_per_stage_encoder"], config["n_conv_per_stage_decoder"]
    if class_name != "PlainConvUNet":
        raise CheckpointError(f"unsupported nnU-Net network class {class_name!r}; MoME uses PlainConvUNet.")
    n_enc = [n_enc] * len(features) if isinstance(n_enc, int) else list(n_enc)
    n_dec = [n_dec] * (len(features) - 1) if isinstance(n_dec, int) else list(n_dec)
    return {
        "features_per_stage": features,
        "kernel_sizes": _triples(kernels, "conv kernel sizes"),
        "strides": _triples(strides, "strides"),
        "n_conv_per_stage": [int(n) for n in n_enc],
        "n_conv_per_stage_decoder": [int(n) for n in n_dec],
    }


def architecture_from_plans(
    plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str = "3d_fullres"
) -> ArchitectureSpec:
    """Reads topology, patch size, spacing, normalisation and labels from nnU-Net plans + dataset.json.

    Raises:
        CheckpointError: the plans describe something this implementation cannot reproduce faithfully.
    """
    config = _resolve_configuration(plans, configuration)
    try:
        topology = _topology_from_configuration(config)
        patch_size = [int(p) for p in config["patch_size"]]
        spacing = [float(s) for s in config["spacing"]]
        schemes = list(config["normalization_schemes"])
        masks = [bool(m) for m in config.get("use_mask_for_norm", [False] * len(schemes))]
    except KeyError as err:
        raise CheckpointError(f"plans configuration {configuration!r} lacks {err}.") from err
    if len(set(schemes)) != 1 or schemes[0] not in _SUPPORTED_NORMALIZATION or len(set(masks)) > 1:
        raise CheckpointError(
            f"unsupported normalisation {schemes} (mask {masks}); supported: one of {sorted(_SUPPORTED_NORMALIZATION)}."
        )
    if list(plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        raise CheckpointError(f"plans transpose axes {plans['transpose_forward']}; only [0, 1, 2] is supported.")
    labels = {str(name): int(value) for name, value in dataset_json.get("labels", {}).items()}
    if sorted(labels.values()) != list(range(len(labels))) or len(labels) < 2:
        raise CheckpointError(
            f"dataset.json labels {labels} are not the consecutive integers 0..C-1 (region-based training is "
            "not supported)."
        )
    if "regions_class_order" in dataset_json:
        raise CheckpointError("region-based nnU-Net models (regions_class_order) are not supported.")
    channel_names = {str(k): str(v) for k, v in dataset_json.get("channel_names", {"0": "MRI"}).items()}
    return ArchitectureSpec(
        **topology,
        patch_size=patch_size,
        spacing=spacing,
        normalization=schemes[0],
        use_mask_for_norm=bool(masks and masks[0]),
        labels=dict(sorted(labels.items(), key=lambda item: item[1])),
        channel_names=channel_names,
        configuration=configuration,
        plans_name=str(plans.get("plans_name", "")),
        dataset_name=str(plans.get("dataset_name", "")),
    )


_CANONICAL_PATTERNS = (
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$"), "encoder.{0}.{1}.{2}.{3}"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$"), "decoder.{0}.{1}.{2}.{3}"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$"), "upsample.{0}.{1}"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$"), "heads.{0}.{1}"),
)
_ALIAS_PATTERN = re.compile(r"(^decoder\.encoder\.)|(\.all_modules\.)")


def _canonical_of_alias(key: str) -> str:
    """The canonical nnU-Net key an alias duplicates (``all_modules.0`` = conv, ``.1`` = norm)."""
    key = key.removeprefix("decoder.") if key.startswith("decoder.encoder.") else key
    return key.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")


def map_unet_state_dict(upstream: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Renames a ``PlainConvUNet`` state_dict from nnU-Net's keys to :class:`scripts.networks.PlainConvUNet`'s.

    ``module.`` / ``_orig_mod.`` prefixes are stripped; the alias keys nnU-Net saves twice
    (``decoder.encoder.*``, ``*.all_modules.*``) are checked against their canonical tensor and dropped.

    Raises:
        CheckpointError: an unknown key, or an alias whose tensor differs from its canonical twin.
    """
    stripped = {}
    for key, tensor in upstream.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        stripped[key] = tensor
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in stripped.items():
        if _ALIAS_PATTERN.search(key):
            twin = stripped.get(_canonical_of_alias(key))
            if twin is None or twin.shape != tensor.shape or not torch.equal(twin, tensor):
                raise CheckpointError(f"{source}: alias key {key!r} does not match its canonical tensor.")
            continue
        for pattern, template in _CANONICAL_PATTERNS:
            match = pattern.match(key)
            if match:
                mapped[template.format(*match.groups())] = tensor
                break
        else:
            raise CheckpointError(f"{source}: unexpected key {key!r}; not an nnU-Net PlainConvUNet state_dict.")
    return mapped


@dataclass
class UpstreamMoME:
    """A MoME checkpoint set read from the authors' layout, ready to load into :class:`scripts.networks.MoME`."""

    spec: ArchitectureSpec
    modalities: list[str]
    state_dict: dict[str, torch.Tensor]
    sha256: dict[str, str]
    trainer_info: dict[str, Any]
    variant: str = MOME

    @property
    def is_plus(self) -> bool:
        """A MoME+ set (dispatch network, multi-channel input with availability vector)."""
        return self.variant == MOME_PLUS


def _checkpoint_files(src: Path) -> tuple[list[Path], Path | None]:
    """Gate file followed by the consecutive expert files ``checkpoint_best1..K.pth``; MoME+'s dispatch file."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory; expected the authors' MoME_CHECKPOINT folder.")
    if not (src / GATE_FILE).is_file():
        found = sorted(p.name for p in src.iterdir())[:10]
        raise CheckpointError(
            f"{src}: wrong layout, {GATE_FILE} (the gate) is missing; expected {GATE_FILE} and "
            f"{expert_file(0)}..{expert_file(4)} (MoME; MoME+: ..{expert_file(3)} and {MOMEPLUS_DISPATCH_FILE}) "
            f"(found {found})."
        )
    experts = []
    while (src / expert_file(len(experts))).is_file():
        experts.append(src / expert_file(len(experts)))
    if not experts:
        raise CheckpointError(f"{src}: wrong layout, no expert checkpoints {expert_file(0)}, {expert_file(1)}, ...")
    stray = sorted(p.name for p in src.glob("checkpoint_best[0-9]*.pth") if p not in experts)
    if stray:
        raise CheckpointError(f"{src}: expert files are not consecutive from {expert_file(0)}: unexpected {stray}.")
    dispatch = src / MOMEPLUS_DISPATCH_FILE
    return [src / GATE_FILE, *experts], (dispatch if dispatch.exists() else None)


def _verify_sha256(files: Sequence[Path], expected: Mapping[str, str]) -> dict[str, str]:
    """SHA-256 of every file; checks the ones named in ``expected`` (by file name)."""
    names = {path.name for path in files}
    unknown = sorted(set(expected) - names)
    if unknown:
        raise CheckpointError(f"--sha256 names files that are not in the checkpoint set: {unknown}.")
    digests = {}
    for path in files:
        digests[path.name] = sha256_of(path)
        want = expected.get(path.name)
        if want is not None and want.lower() != digests[path.name]:
            raise CheckpointError(f"{path}: SHA-256 mismatch (expected {want.lower()}, got {digests[path.name]}).")
    return digests


def _expected_first_conv(spec: ArchitectureSpec, in_channels: int) -> tuple[int, ...]:
    return (spec.features_per_stage[0], in_channels, *spec.kernel_sizes[0])


def _check_role(
    path: Path, weights: Mapping[str, torch.Tensor], in_channels: int, out_channels: int, role: str
) -> None:
    """Rejects a file whose first conv / seg heads do not fit its role (gate or expert) before the full check."""
    first = weights.get("encoder.0.0.conv.weight")
    head = weights.get("heads.0.weight")
    if first is None or head is None:
        raise CheckpointError(f"{path}: no encoder/seg-head weights; not an nnU-Net PlainConvUNet.")
    if first.shape[1] != in_channels or head.shape[0] != out_channels:
        raise CheckpointError(
            f"{path}: not a MoME {role}: it takes {first.shape[1]} input channel(s) and predicts {head.shape[0]} "
            f"channel(s), a MoME {role} of this set needs {in_channels} -> {out_channels}."
        )


def map_dispatch_state_dict(upstream: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """MoME+ dispatch MLP weights (``mlp.{0,2,4,6}.{weight,bias}``) -> ``dispatch.mlp.*`` of :class:`MoMEPlus`.

    Raises:
        CheckpointError: an unknown key or a layer missing.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in upstream.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if not re.fullmatch(r"mlp\.[0246]\.(weight|bias)", key):
            raise CheckpointError(f"{source}: unexpected key {key!r}; not MoME+'s dispatch MLP (mlp.0/2/4/6).")
        mapped[f"dispatch.{key}"] = tensor.float()
    if len(mapped) != 8:
        raise CheckpointError(f"{source}: dispatch MLP has {len(mapped)} of its 8 tensors (mlp.0/2/4/6 weight+bias).")
    return mapped


def _read_specs(files: Sequence[Path], checkpoints: Sequence[Mapping[str, Any]]) -> ArchitectureSpec:
    """The gate's architecture spec, after checking that every expert shares its topology and labels."""
    specs = []
    for path, checkpoint in zip(files, checkpoints):
        init_args = checkpoint["init_args"]
        dataset_json = init_args.get("dataset_json") or {}
        try:
            specs.append(
                architecture_from_plans(init_args["plans"], dataset_json, init_args.get("configuration", "3d_fullres"))
            )
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
    spec = specs[0]
    for path, other in zip(files[1:], specs[1:]):
        if other.topology() != spec.topology() or other.labels != spec.labels:
            raise CheckpointError(f"{path}: its plans/labels differ from the gate's; not one MoME checkpoint set.")
    mirror = checkpoints[0].get("inference_allowed_mirroring_axes")
    if mirror is not None:
        spec = replace(spec, mirror_axes=[int(a) for a in mirror])
    return spec


def _default_modalities(src: Path, n_experts: int, plus: bool) -> Sequence[str]:
    default = MOMEPLUS_MODALITIES if plus else MOME_MODALITIES
    if n_experts != len(default):
        name = "MoME+" if plus else "MoME"
        raise CheckpointError(
            f"{src}: {n_experts} experts found; name them with --modalities ({name} has {len(default)})."
        )
    return default


def read_mome_checkpoints(
    src: Path, expected_sha256: Mapping[str, str] | None = None, modalities: Sequence[str] | None = None
) -> UpstreamMoME:
    """Reads, validates and maps a MoME or MoME+ checkpoint set in the authors' layout.

    Args:
        src: folder with ``checkpoint_best.pth`` (gate) and ``checkpoint_best1..K.pth`` (experts); a MoME+ set
            also holds ``checkpoint_best_dispatch.pth`` (the dispatch MLP, no plans).
        expected_sha256: optional ``{file name: hex digest}`` to verify before unpickling anything.
        modalities: names of the K experts; defaults to T1, T1ce, T2, FLAIR, DWI for MoME (K = 5) and
            T1, T1ce, T2, FLAIR for MoME+ (K = 4).

    Returns:
        The architecture, the state_dict for :class:`scripts.networks.MoME` / :class:`~scripts.networks.MoMEPlus`
        and provenance.

    Raises:
        CheckpointError: any problem with the files, their layout, content or shapes.
    """
    files, dispatch_file = _checkpoint_files(Path(src))
    plus = dispatch_file is not None
    digests = _verify_sha256(files + ([dispatch_file] if plus else []), expected_sha256 or {})
    n_experts = len(files) - 1
    modalities = _default_modalities(Path(src), n_experts, plus) if modalities is None else modalities
    if len(modalities) != n_experts:
        raise CheckpointError(f"{src}: {n_experts} experts but {len(modalities)} modality names {list(modalities)}.")

    checkpoints = [load_checkpoint(path) for path in files]
    spec = _read_specs(files, checkpoints)
    if plus and spec.in_channels != 1:
        raise CheckpointError(f"{files[0]}: MoME+ experts take one channel each, plans say {spec.in_channels}.")
    state_dict: dict[str, torch.Tensor] = {}
    image_channels = n_experts if plus else spec.in_channels
    gate_in = image_channels + n_experts * spec.features_per_stage[0]
    for index, (path, checkpoint) in enumerate(zip(files, checkpoints)):
        weights = map_unet_state_dict(checkpoint["network_weights"], source=str(path))
        if index == 0:
            _check_role(path, weights, gate_in, n_experts * spec.num_classes, "gate")
            prefix = "gate."
        else:
            _check_role(path, weights, spec.in_channels, spec.num_classes, "expert")
            prefix = f"experts.{index - 1}."
        state_dict.update({prefix + key: tensor.float() for key, tensor in weights.items()})
    if plus:
        dispatch = load_checkpoint(dispatch_file, require_plans=False)
        state_dict.update(map_dispatch_state_dict(dispatch["network_weights"], str(dispatch_file)))
    gate = checkpoints[0]
    trainer_info = {
        "trainer_name": gate.get("trainer_name"),
        "current_epoch": gate.get("current_epoch"),
        "fold": gate["init_args"].get("fold"),
        "configuration": spec.configuration,
    }
    n_files = len(files) + int(plus)
    logger.info("read %d %s checkpoints from %s (%d experts)", n_files, "MoME+" if plus else "MoME", src, n_experts)
    variant = MOME_PLUS if plus else MOME
    return UpstreamMoME(spec, [m.lower() for m in modalities], state_dict, digests, trainer_info, variant)
