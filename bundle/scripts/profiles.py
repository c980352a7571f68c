"""Inference profiles: one switch that picks how MoME's logits are computed, and the inferer that does it.

=========  ==============================================================================================
profile    what runs
=========  ==============================================================================================
parity     the authors' algorithm: nnU-Net tiles at step 0.5, Gaussian weighting, float16 accumulation, no
           mirroring; float32 on CPU and float16 autocast on CUDA, as nnU-Net's predictor does.
fast       the default: the same tiles with float32 accumulation; float16 autocast on CUDA; bfloat16 autocast
           on CPUs with native bf16 (AVX512-BF16 / AMX, detected from the CPU flags; float32 on all others).
accurate   parity plus 8-fold mirroring (the authors' published setting).
=========  ==============================================================================================

Why bfloat16 in ``fast``: on a 2-core AVX512-BF16 CPU it makes a release-size 128^3 tile 1.68x faster (55.2 ->
32.8 s, peak RSS 3.0 -> 2.0 GB) and the demo network 2.06x faster, with labels that agree with parity's at 0.995
or better and Dice within 0.001 on 10 held-out cases (the project's profile-agreement benchmark). On CPUs
without native bf16 PyTorch emulates it and is ~26x slower, so it is never used there.

Why ``fast`` keeps parity's tiles: fewer or larger tiles (step 0.75, tiles 1.33x the patch, one whole-volume
tile) are 1.4-4.5x faster on the demo model but change its labels far beyond the quality guard (demo MoME 0.7.0:
median agreement with parity 0.35-0.88, minimum 0.14-0.49, against a bar of 0.98, in the project's
profile-agreement benchmark): with instance normalisation every tile's statistics depend on its field
of view. They stay available as the ``tile_step`` / ``tile_scale`` overrides for
models validated with that benchmark. The exact levers (no deep-supervision heads, pairs of small
tiles per network call, the memory-lean gate for large inputs, ``torch.inference_mode``) apply to every profile.

On CUDA an out-of-memory error falls back from enlarged tiles to patch-sized tiles, then to accumulating the tiles
in CPU memory; ``tta=True`` adds mirroring to any profile.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Dict

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from .inferers import NNUNetSlidingWindowInferer

__all__ = [
    "PROFILES",
    "ProfileInferer",
    "ProfileSettings",
    "auto_batch_size",
    "autocast",
    "autocast_precision",
    "available_memory_bytes",
    "cpu_has_native_bf16",
    "recoverable",
    "tile_bytes",
]


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile does.

    Attributes:
        tile_scale: tile size as a multiple of the training patch (``inf``: one whole-volume tile).
        tile_step: tile step when tiling (fraction of the patch size).
        tta: mirroring over the mirror axes.
        accumulate_dtype: tile accumulation dtype (``"float16"`` is nnU-Net's).
        cpu_bf16: bfloat16 autocast on CPUs with native bf16 support (``fast`` only; ignored on other CPUs).
        cuda_amp: float16 autocast on CUDA.
    """

    tile_scale: float
    tile_step: float
    tta: bool
    accumulate_dtype: str
    cpu_bf16: bool
    cuda_amp: bool = True


PROFILES: Dict[str, ProfileSettings] = {
    "parity": ProfileSettings(tile_scale=1.0, tile_step=0.5, tta=False, accumulate_dtype="float16", cpu_bf16=False),
    "fast": ProfileSettings(tile_scale=1.0, tile_step=0.5, tta=False, accumulate_dtype="float32", cpu_bf16=True),
    "accurate": ProfileSettings(tile_scale=1.0, tile_step=0.5, tta=True, accumulate_dtype="float16", cpu_bf16=False),
}

# Peak bytes of a MoME pass per tile voxel and per stage-0 feature channel, float32. From
# the project's CPU-lever benchmark: a 128^3 release tile with the memory-lean gate peaked at 3.02 GB RSS, of
# which ~1.3 GB are weights and the process, i.e. ~26 bytes per voxel and channel. Used to decide whether an enlarged
# tile fits; patch-sized tiles are the fallback.
BYTES_PER_VOXEL_CHANNEL = 24.0


@lru_cache(maxsize=4)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX on x86; Linux flags), else False.

    Without native support PyTorch emulates bf16 convolutions, which is slower than float32.
    """
    try:
        with open(cpuinfo, encoding="ascii", errors="ignore") as handle:
            flags = set()
            for line in handle:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_precision(device: torch.device, cuda_amp: bool, cpu_bf16: bool) -> str:
    """``"float16"`` (CUDA with ``cuda_amp``), ``"bfloat16"`` (a native-bf16 CPU with ``cpu_bf16``) or ``"float32"``."""
    if device.type == "cuda" and cuda_amp:
        return "float16"
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def autocast(device: torch.device, precision: str):
    """The autocast context of :func:`autocast_precision`'s ``precision`` on ``device`` (a no-op for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: the kernel's MemAvailable), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tile_bytes(spatial_size: Sequence[int], stage0_channels: int, element_size: int = 4) -> int:
    """Estimated peak bytes of one MoME pass over a tile of ``spatial_size`` voxels."""
    voxels = math.prod(int(size) for size in spatial_size)
    return int(voxels * stage0_channels * BYTES_PER_VOXEL_CHANNEL * element_size / 4)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def recoverable(error: BaseException, device: torch.device) -> bool:
    """Whether ``error`` is a GPU out-of-memory error that a smaller-footprint retry can avoid.

    CPU allocations are not retried: the whole-volume pass is budgeted against MemAvailable beforehand instead.
    """
    return device.type == "cuda" and _is_out_of_memory(error)


class ProfileInferer(Inferer):
    """MoME inference under one of :data:`PROFILES`; ``inferer(inputs, network)`` -> float32 logits.

    Every profile runs nnU-Net-style Gaussian-weighted tiles (:class:`~scripts.inferers.NNUNetSlidingWindowInferer`);
    a ``tile_scale`` above 1 enlarges the tiles beyond the training patch (rounded up to the network's size divisor
    and capped at the image), down to a single whole-volume tile.

    Args:
        profile: ``"parity"``, ``"fast"`` or ``"accurate"``.
        roi_size: the network's training patch size.
        mirror_axes: spatial axes mirrored by test-time augmentation.
        tta: add mirroring to any profile (``None``/False: the profile's own choice).
        tile_step: override the profile's tile step.
        tile_scale: override the profile's tile scale (``float("inf")``: one whole-volume tile).
        accumulate_dtype: override the profile's tile accumulation dtype.
        cpu_bf16: override the profile's bfloat16 autocast on CPUs with native bf16 (never on other CPUs).
        sw_batch_size: tiles per network call; ``None`` (default): 2 for small tiles, 1 for large ones
            (see :func:`auto_batch_size`).
        memory_fraction: share of the free memory that enlarged tiles may use.
        progress: progress bar over tiles.
    """

    def __init__(
        self,
        profile: str = "fast",
        roi_size: Sequence[int] = (128, 128, 128),
        mirror_axes: Sequence[int] = (0, 1, 2),
        tta: bool | None = None,
        tile_step: float | None = None,
        tile_scale: float | None = None,
        accumulate_dtype: str | None = None,
        cpu_bf16: bool | None = None,
        sw_batch_size: int | None = None,
        memory_fraction: float = 0.7,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if profile not in PROFILES:
            raise ValueError(f"unknown inference profile {profile!r}; choose one of {', '.join(PROFILES)}.")
        overrides = {
            "tile_step": tile_step, "tile_scale": tile_scale, "accumulate_dtype": accumulate_dtype, "cpu_bf16": cpu_bf16
        }  # fmt: skip
        settings = replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})
        if tta:
            settings = replace(settings, tta=True)
        if settings.tile_scale < 1:
            raise ValueError(f"tile_scale must be >= 1, got {settings.tile_scale}.")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
        self.profile = profile
        self.settings = settings
        self.roi_size = tuple(int(r) for r in roi_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.sw_batch_size = sw_batch_size
        self.memory_fraction = float(memory_fraction)
        self.progress = progress
        self.tiler(self.roi_size)  # validates roi_size, step and dtype now
        self.last_run: Dict[str, Any] = {}

    # -- what runs -----------------------------------------------------------------------------------------------
    def tiler(self, roi: Sequence[int], network: Any = None) -> NNUNetSlidingWindowInferer:
        """The tiler for tiles of size ``roi`` under this profile."""
        s = self.settings
        batch = self.sw_batch_size or auto_batch_size(roi, network)
        return NNUNetSlidingWindowInferer(
            roi, tile_step=s.tile_step, tta=s.tta, mirror_axes=self.mirror_axes,
            accumulate_dtype=s.accumulate_dtype, sw_batch_size=batch, progress=self.progress,
        )  # fmt: skip

    def tile_size(self, image_size: Sequence[int], divisor: Sequence[int]) -> tuple[int, int, int]:
        """Tile size for an image: the patch times ``tile_scale``, rounded up to ``divisor``, capped at the image."""
        sizes = []
        for patch, size, div in zip(self.roi_size, image_size, divisor):
            covering = max(patch, math.ceil(int(size) / div) * div)
            wanted = patch * self.settings.tile_scale
            scaled = covering if math.isinf(wanted) else math.ceil(wanted / div) * div
            sizes.append(int(min(max(patch, scaled), covering)))
        return sizes[0], sizes[1], sizes[2]

    def precision(self, device: torch.device) -> str:
        """``"float16"`` (CUDA autocast), ``"bfloat16"`` (CPU autocast) or ``"float32"`` on ``device``."""
        return autocast_precision(device, self.settings.cuda_amp, self.settings.cpu_bf16)

    def tile_fits(self, tile: Sequence[int], network: Any, device: torch.device) -> bool:
        """Whether a tile of this size is expected to fit in the free memory of ``device``."""
        free = available_memory_bytes(device)
        if free is None:
            return True
        element = 2 if self.precision(device) != "float32" else 4
        return tile_bytes(tile, _stage0_channels(network), element) <= self.memory_fraction * free

    def describe(self) -> Dict[str, Any]:
        """Profile settings plus what the last call actually did (for reports)."""
        s = self.settings
        scale = "whole volume" if math.isinf(s.tile_scale) else s.tile_scale
        return {"profile": self.profile, "tile_step": s.tile_step, "tile_scale": scale, "tta": s.tta,
                "accumulate_dtype": s.accumulate_dtype, **self.last_run}  # fmt: skip

    # -- running -------------------------------------------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """Logits ``(B, C_out, D, H, W)`` (float32, on the input's device) for ``inputs`` ``(B, C, D, H, W)``."""
        if inputs.ndim != 5:
            raise ValueError(f"expected inputs of shape (B, C, D, H, W), got {tuple(inputs.shape)}.")
        images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        device = images.device
        self.last_run = {"precision": self.precision(device)}
        tile = self.tile_size(images.shape[-3:], _size_divisor(network))
        if tile != self.roi_size and not self.tile_fits(tile, network, device):
            self.last_run["fallback"] = f"tiles of {list(tile)} exceed the memory budget"
            tile = self.roi_size
        with autocast(device, self.precision(device)):
            outputs = self._run_tiles(images, network, device, tile, **kwargs)
        outputs = outputs.float()
        if isinstance(inputs, MetaTensor):
            return convert_to_dst_type(outputs, inputs, dtype=outputs.dtype)[0]
        return outputs

    def _run_tiles(self, images, network, device, tile, **kwargs) -> torch.Tensor:
        attempts = [(tile, False)] + ([(self.roi_size, False)] if tile != self.roi_size else [])
        attempts.append((self.roi_size, True))
        for number, (size, on_cpu) in enumerate(attempts):
            tiler = self.tiler(size, network)
            n_tiles = len(tiler.tiles(_padded_size(images.shape[-3:], size)))
            self.last_run.update(tile_size=list(size), n_tiles=n_tiles, tiles_per_call=tiler.sw_batch_size)
            try:
                if on_cpu:
                    self.last_run["accumulation"] = "cpu (GPU out of memory)"
                    return tiler(images.cpu(), _AccumulateOn(network, device), **kwargs).to(device)
                return tiler(images, network, **kwargs)
            except RuntimeError as error:
                if number == len(attempts) - 1 or not recoverable(error, device):
                    raise
                self.last_run["fallback"] = f"tiles of {list(size)} ran out of GPU memory"
                _empty_cache(device)
        raise AssertionError("unreachable")


class _AccumulateOn:
    """Wraps a network so tiles come from CPU memory, run on ``device`` and return to the CPU (GPU OOM fallback)."""

    def __init__(self, network: Callable[..., torch.Tensor], device: torch.device) -> None:
        self.network, self.device = network, device

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.network(x.to(self.device), **kwargs).cpu()


# Tiles are batched in pairs while the gate input of a pair stays under this size. Measured (cpu_levers_demo.json):
# a 48^3 demo tile costs 2.07 s alone and 0.63 s in a pair, because PyTorch's CPU convolution only takes the oneDNN
# path for batch > 1 or large enough inputs and otherwise falls back to a much slower im2col kernel; large release
# tiles already take oneDNN and would double their memory.
PAIR_TILES_BELOW_BYTES = 256 * 2**20


def auto_batch_size(roi: Sequence[int], network: Any) -> int:
    """2 tiles per network call for small tiles, 1 for large ones (see ``PAIR_TILES_BELOW_BYTES``)."""
    voxels = math.prod(int(r) for r in roi)
    channels = int(getattr(_gate(network), "in_channels", 1) or 1)
    return 2 if 2 * voxels * channels * 4 < PAIR_TILES_BELOW_BYTES else 1


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _size_divisor(network: Any) -> tuple[int, int, int]:
    divisor = getattr(network, "size_divisor", (1, 1, 1))
    return tuple(int(d) for d in divisor)  # type: ignore[return-value]


def _gate(network: Any) -> Any:
    """A MoME's gate U-Net (whose input is the widest tensor), or the network itself."""
    return getattr(network, "gate", network)


def _stage0_channels(network: Any) -> int:
    """Stage-0 feature channels of a MoME / U-Net (the width that dominates whole-volume memory)."""
    features = getattr(_gate(network), "features_per_stage", None)
    return int(features[0]) if features else 32


def _padded_size(size: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(int(s), int(r)) for s, r in zip(size, roi))
