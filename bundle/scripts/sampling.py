"""Training and validation patches: nnU-Net's foreground-oversampling patch sampler and MoME+'s modality dropout.

Randomness is a pure function of ``(seed, iteration, sample)``: the case, the patch position and every augmentation
parameter are drawn from ``numpy.random.default_rng([seed, iteration, sample])``, so a resumed run continues exactly
where it stopped without saving any generator state, and ``W`` data-parallel replicas together draw exactly the
samples of one process. Validation uses fixed patches (:func:`_validation_patches`).
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from .losses import UNKNOWN_MODALITY
from .plus import AVAILABILITY_KEY, availability_patterns

__all__ = ["PatchSampler", "PlusPatchSampler"]


class PatchSampler:
    """Draws training batches from cached cases; randomness is a function of ``(seed, iteration, sample)``.

    Args:
        cases: dicts with ``image`` ``(1, D, H, W)`` float tensor, ``label`` ``(1, D, H, W)`` and ``expert``
            (modality index, ``-1`` if unknown).
        patch_size: spatial patch size (network axis order).
        batch_size: samples per batch.
        foreground_fraction: nnU-Net's oversampling: samples with index ``>= round(B * (1 - f))`` are centred on a
            lesion voxel (with ``B = 1`` a sample is forced with probability ``f``).
        augmentation: optional MONAI dictionary transform applied to each ``{"image", "label"}`` patch; its random
            state is reseeded per sample.
        seed: base seed.
        rank, world_size: data-parallel shard. ``batch_size`` is the global batch: replica ``rank`` draws samples
            ``rank * B / W ... (rank + 1) * B / W - 1`` of each iteration, so ``W`` replicas together see exactly the
            batches of one process.
    """

    def __init__(
        self,
        cases: Sequence[Dict[str, object]],
        patch_size: Sequence[int],
        batch_size: int = 2,
        foreground_fraction: float = 0.33,
        augmentation: Callable | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not cases:
            raise ValueError("no training cases.")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(
                f"the batch of {batch_size} cannot be split evenly over {world_size} data-parallel replicas "
                f"(rank {rank}): make batch_size a multiple of the number of processes."
            )
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.foreground_fraction = foreground_fraction
        self.augmentation = augmentation
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self._foreground = [torch.nonzero(torch.as_tensor(c["label"])[0] > 0) for c in self.cases]
        self._thread = threading.local()  # a loader thread's own copy of the augmentation

    def _forced(self, sample: int, rng: np.random.Generator) -> bool:
        """Whether sample ``sample`` of a batch must be centred on a lesion voxel (foreground oversampling)."""
        if self.batch_size == 1:
            return bool(rng.random() < self.foreground_fraction)
        return sample >= round(self.batch_size * (1 - self.foreground_fraction))

    def _start(self, shape: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None) -> List[int]:
        """Patch start per axis: uniformly random, or around ``centre`` (clipped so the patch stays inside)."""
        starts = []
        for axis, (size, patch) in enumerate(zip(shape, self.patch_size)):
            high = size - patch
            if centre is None:
                starts.append(int(rng.integers(min(0, high), max(0, high) + 1)))
            else:
                starts.append(int(np.clip(centre[axis] - patch // 2, min(0, high), max(0, high))))
        return starts

    def _crop(self, volume: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        """Crops a patch; regions outside the volume are zero-padded."""
        out = volume.new_zeros((volume.shape[0], *self.patch_size))
        src, dst = [], []
        for s, size, patch in zip(start, volume.shape[1:], self.patch_size):
            lo, hi = max(s, 0), min(s + patch, size)
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, hi - s))
        out[(slice(None), *dst)] = volume[(slice(None), *src)]
        return out

    def sample(self, iteration: int, index: int) -> Dict[str, torch.Tensor]:
        """Sample ``index`` of batch ``iteration``: ``image``, ``label`` and ``expert`` (modality index)."""
        return self._sample_case(iteration, index)[1]

    def _sample_case(self, iteration: int, index: int) -> Tuple[int, Dict[str, torch.Tensor]]:
        """``(case index, sample)`` of sample ``index`` of batch ``iteration`` (see :meth:`sample`)."""
        rng = np.random.default_rng([self.seed, iteration, index])
        case_index = int(rng.integers(len(self.cases)))
        case = self.cases[case_index]
        image, label = torch.as_tensor(case["image"]), torch.as_tensor(case["label"])
        foreground = self._foreground[case_index]
        centre = None
        if self._forced(index, rng) and len(foreground):
            centre = foreground[int(rng.integers(len(foreground)))].tolist()
        start = self._start(image.shape[1:], rng, centre)
        patch = {"image": self._crop(image.float(), start), "label": self._crop(label.float(), start)}
        augmentation = getattr(self._thread, "augmentation", self.augmentation)
        if augmentation is not None:
            if hasattr(augmentation, "set_random_state"):
                augmentation.set_random_state(seed=int(rng.integers(2**31)))
            patch = augmentation(patch)
        return case_index, {
            "image": torch.as_tensor(patch["image"]).float(),
            "label": torch.as_tensor(patch["label"]).round().clamp(0).long(),
            "expert": torch.tensor(int(case.get("expert", UNKNOWN_MODALITY))),
        }

    def batch(self, iteration: int, whole: bool = False) -> Dict[str, torch.Tensor]:
        """This replica's share of batch ``iteration`` (the whole batch with ``whole=True`` or a single process)."""
        share = self.batch_size // self.world_size
        indices = range(self.batch_size) if whole else range(self.rank * share, (self.rank + 1) * share)
        samples = [self.sample(iteration, b) for b in indices]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def batches(self, iterations: Iterable[int], threads: int = 0, pin_memory: bool = False) -> Iterator[Dict]:
        """This replica's batches of ``iterations``, in order, equal to :meth:`batch` of each.

        With ``threads > 0`` they are prepared ahead (up to ``2 * threads`` batches) in that many background threads,
        each with its own copy of the augmentation, while the caller trains on the current one: nnU-Net's background
        workers, as threads (the crops, MONAI transforms and ``torch`` ops release the GIL for their heavy work).
        ``pin_memory`` page-locks each batch in its thread for an asynchronous copy to the GPU.
        """
        if threads <= 0:
            for iteration in iterations:
                yield self._loaded_batch(iteration, pin_memory)
            return
        pending: deque[Future] = deque()
        remaining = iter(iterations)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="mome-batches", initializer=self._start_loader_thread)
        try:
            for iteration in itertools.islice(remaining, 2 * threads):
                pending.append(pool.submit(self._loaded_batch, iteration, pin_memory))
            while pending:
                batch = pending.popleft().result()
                for iteration in itertools.islice(remaining, 1):
                    pending.append(pool.submit(self._loaded_batch, iteration, pin_memory))
                yield batch
        finally:  # also when the consumer stops early (an error in a training step)
            pool.shutdown(wait=True, cancel_futures=True)

    def _start_loader_thread(self) -> None:
        """Gives a loader thread its own copy of the augmentation (MONAI random transforms hold state)."""
        self._thread.augmentation = copy.deepcopy(self.augmentation)

    def _loaded_batch(self, iteration: int, pin_memory: bool) -> Dict[str, torch.Tensor]:
        """:meth:`batch` ``iteration``, page-locked with ``pin_memory``."""
        batch = self.batch(iteration)
        return _pinned(batch) if pin_memory else batch


def _pinned(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``batch`` with every tensor in page-locked memory (for an asynchronous copy to the GPU)."""
    return {key: value.pin_memory() for key, value in batch.items()}


class PlusPatchSampler(PatchSampler):
    """:class:`PatchSampler` for MoME+: each sample also gets a random availability vector (modality dropout).

    The vector is drawn uniformly from the non-empty subsets of the case's own available modalities (all ``2^M - 1``
    when every channel is present, as upstream), from ``default_rng([seed, iteration, sample, 1])``. Missing channels
    are zeroed in the patch, so nothing of a dropped modality reaches the network.
    """

    def __init__(self, cases: Sequence[Dict[str, object]], patch_size: Sequence[int], *args, **kwargs) -> None:
        super().__init__(cases, patch_size, *args, **kwargs)
        channels = int(torch.as_tensor(self.cases[0]["image"]).shape[0])
        self.patterns = torch.tensor(availability_patterns(channels), dtype=torch.float32)

    def sample(self, iteration: int, index: int) -> Dict[str, torch.Tensor]:
        """:meth:`PatchSampler.sample` plus ``availability``; the image's unavailable channels are zeroed."""
        case_index, drawn = self._sample_case(iteration, index)
        present = self.cases[case_index].get(AVAILABILITY_KEY)
        allowed = self.patterns
        if present is not None:
            allowed = self.patterns[(self.patterns <= torch.as_tensor(present).float()).all(dim=1)]
        rng = np.random.default_rng([self.seed, iteration, index, 1])
        availability = allowed[int(rng.integers(len(allowed)))]
        drawn["image"] = drawn["image"] * availability[:, None, None, None]
        drawn[AVAILABILITY_KEY] = availability
        return drawn


def _validation_patches(cases: Sequence[Dict[str, object]], patch_size: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
    """Two fixed patches per validation case: centred on the lesion's median voxel and on the volume centre."""
    sampler = PatchSampler(cases, patch_size, batch_size=1)
    patches = []
    for case, foreground in zip(sampler.cases, sampler._foreground):
        image, label = torch.as_tensor(case["image"]).float(), torch.as_tensor(case["label"]).float()
        centres = [[s // 2 for s in image.shape[1:]]]
        if len(foreground):
            centres.insert(0, foreground.median(dim=0).values.tolist())
        for centre in centres:
            start = sampler._start(image.shape[1:], np.random.default_rng(0), centre)
            patches.append(
                {
                    "image": sampler._crop(image, start),
                    "label": sampler._crop(label, start).long(),
                    "expert": int(case.get("expert", UNKNOWN_MODALITY)),
                    AVAILABILITY_KEY: case.get(AVAILABILITY_KEY),
                }
            )
    return patches
