"""Training of MoME experts, joint MoME (curriculum) and plain U-Nets, driven by the bundle's train configs.

Design choices (documented in ``docs/README.md``):

* Randomness is a pure function of ``(seed, iteration, sample)``: the case, the patch position and every
  augmentation parameter are drawn from ``numpy.random.default_rng([seed, iteration, sample])``. Resuming therefore
  continues exactly where a run stopped; no generator state has to be saved.
* The learning rate follows nnU-Net's poly schedule, set at the start of each epoch; the curriculum progress
  ``r = epoch / epochs`` is held within an epoch, as upstream.
* ``checkpoint_latest.pt`` holds every network (one ``state_dict`` for the whole MoME, so no expert can be forgotten on
  resume), the optimizer with its momentum buffers, the AMP scaler, the epoch, the EMA of the validation Dice and the
  history; it is written atomically after every epoch and read with ``weights_only=True``.
* Validation is nnU-Net's pseudo-Dice: fixed patches of the validation cases (one centred on the lesion, one at the
  volume centre), eval mode, full-resolution argmax, true/false positives and false negatives pooled per modality.
  ``model.pt`` (plain ``state_dict``) is written whenever the EMA (0.9/0.1) of the mean Dice over modalities improves.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from monai.data import load_decathlon_datalist
from monai.transforms import Compose
from torch import nn

from .losses import UNKNOWN_MODALITY, MoMELoss, MoMEPlusLoss, nnunet_deep_supervision_loss
from .networks import MoME, MoMEPlus, PlainConvUNet, he_init
from .plus import AVAILABILITY_KEY, availability_patterns, pattern_name
from .profiles import autocast, autocast_precision

__all__ = [
    "PatchSampler",
    "PlusPatchSampler",
    "Trainer",
    "default_loader_threads",
    "distributed_context",
    "load_experts",
    "load_extending",
    "modality_index",
    "poly_lr",
    "read_datalist",
    "read_plus_datalist",
    "routing_groups",
    "split_by_subject",
]

CHECKPOINT = "checkpoint_latest.pt"
MODEL = "model.pt"
LOG = "train_log.jsonl"


def modality_index(modality: str, modalities: Sequence[str]) -> int:
    """Expert index of a modality id (case-insensitive); ``-1`` when it is not one of ``modalities``."""
    lowered = [m.lower() for m in modalities]
    return lowered.index(modality.lower()) if modality and modality.lower() in lowered else UNKNOWN_MODALITY


def read_datalist(
    dataset_json: str | Sequence[str], modalities: Sequence[str] | None = None, key: str = "training"
) -> List[Dict[str, object]]:
    """Cases of one or more dataset JSONs (paths made absolute), optionally only those of ``modalities``.

    The modality of a case comes from its ``"modality"`` field, never from its file name. Several datasets (e.g.
    ``--dataset_json "['a/dataset.json', 'b/dataset.json']"``) are concatenated in the order given, each with paths
    relative to its own folder; a subject ID present in two of them is refused, as the validation split groups cases
    by subject and would join two different people.
    """
    if not isinstance(dataset_json, (str, Path)):
        return _concatenate_datalists([read_datalist(str(j), modalities, key) for j in dataset_json], dataset_json)
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset JSON not found (make one with `python -m scripts.synthetic`).")
    cases = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(path.parent))
    missing = [c.get("image") for c in cases if "modality" not in c]
    if missing:
        raise ValueError(f"{path}: {len(missing)} cases have no 'modality' field, e.g. {missing[0]}.")
    if modalities is not None:
        wanted = {m.lower() for m in modalities}
        cases = [c for c in cases if str(c["modality"]).lower() in wanted]
    if not cases:
        raise ValueError(f"{path}: no cases with modality in {list(modalities or [])}.")
    return cases


def _subject(case: Dict[str, object]) -> str:
    return str(case.get("subject", case.get("case", case["image"])))


def _concatenate_datalists(datalists: Sequence[List[Dict[str, object]]], sources: Sequence[str]) -> List[Dict]:
    if not datalists:
        raise ValueError("no dataset JSON given.")
    owner: Dict[str, str] = {}
    for cases, source in zip(datalists, sources):
        for subject in {_subject(c) for c in cases}:
            if owner.setdefault(subject, str(source)) != str(source):
                raise ValueError(f"subject {subject!r} is in both {owner[subject]} and {source}; rename one of them.")
    return [case for cases in datalists for case in cases]


def read_plus_datalist(dataset_json: str, modalities: Sequence[str], key: str = "training") -> List[Dict[str, object]]:
    """Multi-channel MoME+ cases of a dataset JSON (``image`` = one file per channel, paths made absolute).

    The dataset's channel order (``channel_names``) must equal ``modalities``: channels are matched by position,
    so a different order would feed every expert the wrong contrast.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: dataset JSON not found (make one with `python -m scripts.synthetic --multichannel`)."
        )
    channels = [str(v).lower() for _, v in sorted(json.loads(path.read_text()).get("channel_names", {}).items())]
    if channels != [m.lower() for m in modalities]:
        raise ValueError(f"{path}: channels {channels} differ from the model's modalities {list(modalities)}.")
    cases = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(path.parent))
    wrong = [c["image"] for c in cases if not isinstance(c["image"], list) or len(c["image"]) != len(modalities)]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} cases do not list {len(modalities)} channel files, e.g. {wrong[0]}.")
    return cases


def split_by_subject(
    cases: Sequence[Dict[str, object]], val_fraction: float, seed: int, part: str
) -> List[Dict[str, object]]:
    """Deterministic train/validation split that keeps all contrasts of a subject on the same side."""
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}.")
    subjects = sorted({_subject(c) for c in cases})
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, int(round(val_fraction * len(subjects))))) if val_fraction > 0 else 0
    val = {subjects[i] for i in order[:n_val]}
    keep = (lambda s: s in val) if part == "val" else (lambda s: s not in val)
    return [c for c in cases if keep(_subject(c))]


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly learning rate for ``epoch`` (0-based)."""
    return initial_lr * (1.0 - epoch / epochs) ** exponent


def load_experts(network: MoME, checkpoints: Sequence[str], reinit_heads: bool = False, strict: bool = True) -> MoME:
    """Initialises MoME's experts from single-expert ``state_dict`` files (``train_expert.json`` outputs).

    Args:
        network: the MoME whose ``experts[k]`` receives ``checkpoints[k]``.
        checkpoints: one file per expert, in expert order.
        reinit_heads: re-initialise the experts' 1x1x1 heads after loading, as the authors' code does
            (its ``load_pretrained_weights`` skips ``seg_layers``). Off by default: see docs/README.md.
        strict: passed to ``load_state_dict``.
    """
    if len(checkpoints) != len(network.experts):
        raise ValueError(f"{len(network.experts)} experts but {len(checkpoints)} checkpoints were given.")
    for expert, path in zip(network.experts, checkpoints):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: expert checkpoint not found (train it with configs/train_expert.json).")
        expert.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=strict)
        if reinit_heads:
            expert.heads.apply(he_init)
    return network


def routing_groups(network: nn.Module, routing_lr_scale: float) -> List[Dict[str, object]]:
    """Optimizer parameter groups: MoME's classifier routing layers with ``lr_scale``, everything else without.

    The routing layers start at zero and must grow to the size of the gate's weights (about 1) within a short
    fine-tune; with Adam each step moves them by about the learning rate, hence the scale.
    """
    routing = [p for name, p in network.named_parameters() if name.startswith("routing.")]
    others = [p for name, p in network.named_parameters() if not name.startswith("routing.")]
    return [{"params": others}, {"params": routing, "lr_scale": float(routing_lr_scale)}]


def load_extending(network: MoME, path: str) -> MoME:
    """Loads a MoME state dict saved without the modality classifier into ``network`` that has one.

    The classifier and the routing layers keep their initialisation; the routing layers start at zero, so the loaded
    network computes exactly what the saved one did until training moves them. Any other difference is an error.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = network.state_dict()
    for key, value in state.items():
        if key not in saved:
            if not key.startswith(("classifier.", "routing.")):
                raise KeyError(f"{path}: no {key!r} in the checkpoint.")
            continue
        old = saved[key]
        if old.shape != value.shape:
            raise ValueError(f"{path}: {key!r} has shape {tuple(old.shape)}, the network {tuple(value.shape)}.")
        state[key] = old
    unexpected = sorted(set(saved) - set(state))
    if unexpected:
        raise KeyError(f"{path}: unexpected keys {unexpected[:3]}.")
    network.load_state_dict(state, strict=True)
    return network


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
        if self.batch_size == 1:
            return bool(rng.random() < self.foreground_fraction)
        return sample >= round(self.batch_size * (1 - self.foreground_fraction))

    def _start(self, shape: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None) -> List[int]:
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
        self._thread.augmentation = copy.deepcopy(self.augmentation)

    def _loaded_batch(self, iteration: int, pin_memory: bool) -> Dict[str, torch.Tensor]:
        batch = self.batch(iteration)
        return _pinned(batch) if pin_memory else batch


def _pinned(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
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


class Trainer:
    """nnU-Net-style training loop for a MoME (curriculum) or a single U-Net (expert or universal baseline).

    Args:
        network: a :class:`scripts.networks.MoME` (joint training with :class:`scripts.losses.MoMELoss`) or a
            :class:`scripts.networks.PlainConvUNet` (deep-supervised Dice + CE).
        optimizer: optimizer over all trainable parameters (SGD, Nesterov, momentum 0.99 as upstream).
        train_cases: cached cases (``image``, ``label``, ``modality``) in network axis order, normalised.
        val_cases: cases for the per-epoch pseudo-Dice (may be empty).
        patch_size: training patch size.
        output_dir: where ``checkpoint_latest.pt``, ``model.pt``, ``model_final.pt`` and ``train_log.jsonl`` go.
        modalities: modality ids in expert order (used for routing and the per-modality log).
        epochs, iterations_per_epoch, batch_size, initial_lr, poly_exponent: nnU-Net schedule.
        curriculum_exponent, expert_reduction: see :class:`scripts.losses.MoMELoss`.
        grad_clip: max gradient norm (``None``/0 disables).
        clip_scope: ``"all"`` clips each network separately (our default), ``"gate"`` only the gate (upstream).
        augmentation: MONAI dictionary transform for training patches.
        foreground_fraction: nnU-Net's foreground oversampling.
        seed: base seed of all sampling.
        device: torch device; AMP (``torch.autocast`` + ``GradScaler``) is used on CUDA when ``amp``.
        cpu_bf16: on a CPU that computes bfloat16 natively (AVX512-BF16/AMX, see
            :func:`scripts.profiles.cpu_has_native_bf16`), run the forward passes under bfloat16 autocast and the
            losses on float32 logits; no loss scaling is needed (bf16 has float32's exponent range) and the weights and
            optimiser stay float32.
            Ignored on CUDA and on other CPUs, where bf16 is emulated and slower than float32. A 64^3 expert step
            (batch 2, two threads) took 0.38 s against 0.65 s in float32 on an AVX512-BF16 EPYC. Not taken where a
            U-Net stage would see a patch 2 voxels deep (see :func:`bf16_training_hazard`).
        channels_last: use the channels-last 3-D memory layout on CPU (about 20 % faster convolutions here).
        resume: continue from ``output_dir/checkpoint_latest.pt`` when it exists.
        progress: show a progress bar per epoch.
        max_iterations: stop after this many iterations in total (for smoke tests and budgets); ``None`` = all.
        modality_dropout: a plain multi-channel U-Net trained like MoME+ (random availability per sample, dropped
            channels zero-filled; validation per availability pattern): the MoME+ benchmark's baseline.
        gate_warmup_epochs: MoME only. Train only the gate, on the fused loss, for this many first epochs, with the
            experts frozen (their forward runs without autograd, so an iteration costs about half); the curriculum
            then runs over the remaining epochs (``r = (epoch - warm-up) / (epochs - warm-up)``). 0 (default) is the
            authors' recipe. Why: the gate's weights are raw, not softmax-normalised, so at initialisation the fused
            output is a random signed mix of expert logits (pseudo-Dice 0.02 with five trained experts), and the
            curriculum gives the fused loss almost no weight while ``r`` is small; short CPU schedules never recover.
        gate_routing_weight: MoME only. Weight of the gate routing prior of :class:`scripts.losses.MoMELoss` (our
            extension; 0, the default, is the authors' loss).
        classifier_warmup_steps: MoME with a modality classifier only. Before the first epoch, train the classifier
            alone for this many steps (Adam, ``classifier_warmup_lr``, cross-entropy against the samples' modality,
            on the training sampler's batches): inside the joint loss at lr 1e-3 it stayed at chance for 100
            iterations, so the gate's prior carried no information.
        classifier_warmup_lr: learning rate of that warm-up.
        loader_threads: background threads that sample and augment the next batches while the network trains on the
            current one (see :meth:`PatchSampler.batches`; the batches are identical either way). ``None`` (default):
            :func:`default_loader_threads`, i.e. none on the CPU, where the step already uses every core and the
            augmentation is about 1 % of it, and up to 4 with a GPU, where it would otherwise dominate the step.

    Data-parallel training: when a ``torch.distributed`` process group is initialised (``torchrun`` with
    ``configs/multi_gpu_train.json``), the network is wrapped in ``DistributedDataParallel`` and ``batch_size`` is the
    global batch, split evenly over the processes (nnU-Net's convention): each replica draws its share of exactly the
    samples one process would draw, the losses are means over the batch (the summed expert loss is scaled by the world
    size, see :class:`scripts.losses.MoMELoss`), so ``W`` processes follow the single-process run up to the order of
    floating-point sums. Only rank 0 validates, logs and writes files; every rank resumes from the same checkpoint.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_cases: Sequence[Dict[str, object]],
        val_cases: Sequence[Dict[str, object]],
        patch_size: Sequence[int],
        output_dir: str,
        modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair", "dwi"),
        epochs: int = 800,
        iterations_per_epoch: int = 250,
        batch_size: int = 2,
        initial_lr: float = 1e-3,
        poly_exponent: float = 0.9,
        curriculum_exponent: float = 2.0,
        expert_reduction: str = "sum",
        grad_clip: float | None = 12.0,
        clip_scope: str = "all",
        augmentation: Callable | None = None,
        foreground_fraction: float = 0.33,
        seed: int = 0,
        device: str | torch.device = "cpu",
        amp: bool = True,
        cpu_bf16: bool = False,
        channels_last: bool = True,
        resume: bool = True,
        progress: bool = True,
        max_iterations: int | None = None,
        gate_warmup_epochs: int = 0,
        curriculum: bool = True,
        val_patterns: Sequence[Sequence[int]] | None = None,
        modality_dropout: bool = False,
        gate_routing_weight: float = 0.0,
        classifier_warmup_steps: int = 0,
        classifier_warmup_lr: float = 3e-3,
        loader_threads: int | None = None,
    ) -> None:
        if clip_scope not in ("all", "gate"):
            raise ValueError(f"clip_scope must be 'all' or 'gate', got {clip_scope!r}.")
        self.device = torch.device(device)
        self.rank, self.world_size = distributed_context()
        self.network = network.to(self.device)
        self.is_mome = isinstance(network, MoME)
        self.is_plus = isinstance(network, MoMEPlus)
        if gate_warmup_epochs and not (self.is_mome and 0 <= gate_warmup_epochs < epochs):
            raise ValueError(f"gate_warmup_epochs={gate_warmup_epochs} needs a MoME and fewer than epochs={epochs}.")
        self.gate_warmup_epochs = int(gate_warmup_epochs)
        self.channels_last = channels_last and self.device.type == "cpu"
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)
        self.optimizer = optimizer
        self.modalities = [m.lower() for m in modalities]
        self.train_cases = self._with_expert(train_cases)
        self.val_patches = _validation_patches(self._with_expert(val_cases), patch_size) if val_cases else []
        self.dropout = self.is_plus or modality_dropout
        sampler = PlusPatchSampler if self.dropout else PatchSampler
        shard = {"rank": self.rank, "world_size": self.world_size}
        self.sampler = sampler(
            self.train_cases, patch_size, batch_size, foreground_fraction, augmentation, seed, **shard
        )
        self.num_classes = int(network.num_classes if self.is_mome else network.out_channels)
        self.val_patterns = self._val_patterns(val_patterns) if self.dropout else []
        levels = self._levels(network)
        if self.is_plus:
            self.loss = MoMEPlusLoss(levels, curriculum_exponent, expert_reduction, curriculum, self.world_size)
        else:
            mome_loss = MoMELoss(
                levels, curriculum_exponent, expert_reduction, gate_routing_weight, replicas=self.world_size
            )
            self.loss = mome_loss if self.is_mome else None
        self.single_loss = None if self.is_mome else nnunet_deep_supervision_loss(levels)
        self.output_dir = Path(output_dir)
        self.epochs, self.iterations_per_epoch = epochs, iterations_per_epoch
        self.initial_lr, self.poly_exponent = initial_lr, poly_exponent
        self.grad_clip, self.clip_scope = grad_clip, clip_scope
        self.precision = autocast_precision(self.device, amp, cpu_bf16)
        hazard = bf16_training_hazard(network, patch_size) if self.precision == "bfloat16" else None
        if hazard:
            _log(f"cpu_bf16 ignored, training in float32: {hazard}")
            self.precision = "float32"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "float16")
        self.resume, self.progress, self.max_iterations = resume, progress, max_iterations
        if classifier_warmup_steps and getattr(network, "classifier", None) is None:
            raise ValueError("classifier_warmup_steps needs a MoME with a modality classifier.")
        self.classifier_warmup_steps, self.classifier_warmup_lr = int(classifier_warmup_steps), classifier_warmup_lr
        self.start_epoch, self.ema_dice, self.best_ema, self.history = 0, None, -1.0, []
        self.loader_threads = default_loader_threads(self.device) if loader_threads is None else int(loader_threads)
        self.model = self._data_parallel()

    def _data_parallel(self) -> nn.Module:
        """The module the training steps call: the network, or its DDP wrapper in a multi-process run."""
        if self.world_size == 1:
            return self.network
        device_ids = [self.device] if self.device.type == "cuda" else None
        # gate warm-up freezes the experts, so their parameters get no gradient in those epochs
        unused = bool(self.gate_warmup_epochs)
        return nn.parallel.DistributedDataParallel(self.network, device_ids=device_ids, find_unused_parameters=unused)

    @property
    def is_main(self) -> bool:
        """Whether this process validates, logs and writes files (rank 0, or the only process)."""
        return self.rank == 0

    def _val_patterns(self, patterns: Sequence[Sequence[int]] | None) -> List[torch.Tensor]:
        """MoME+ validation availability patterns: all modalities, then each one alone (default)."""
        m = self.network.num_modalities if self.is_plus else self.network.in_channels
        if patterns is None:
            patterns = [[1] * m] + [[int(j == i) for j in range(m)] for i in range(m)]
        checked = [torch.tensor([float(v) for v in p]) for p in patterns]
        if any(len(p) != m or not 0 < float(p.sum()) or not bool(((p == 0) | (p == 1)).all()) for p in checked):
            raise ValueError(f"val_patterns must be 0/1 vectors of length {m} with at least one 1, got {patterns}.")
        return checked

    def _with_expert(self, cases: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
        return [{**c, "expert": modality_index(str(c.get("modality", "")), self.modalities)} for c in cases]

    @staticmethod
    def _levels(network: nn.Module) -> int:
        unet = network.gate if isinstance(network, MoME) else network
        return len(unet.decoder)

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT

    def save_checkpoint(self, next_epoch: int) -> None:
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": next_epoch,
            "ema_dice": -1.0 if self.ema_dice is None else self.ema_dice,
            "best_ema": self.best_ema,
            "history": json.dumps(self.history),
        }
        _atomic_save(state, self._checkpoint_path())

    def load_checkpoint(self) -> bool:
        path = self._checkpoint_path()
        if not (self.resume and path.is_file()):
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.network.load_state_dict(state["network"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.ema_dice = None if state["ema_dice"] < 0 else float(state["ema_dice"])
        self.best_ema = float(state["best_ema"])
        self.history = json.loads(state["history"])
        return True

    # -- one step ---------------------------------------------------------------------------------------------------
    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else tensor

    def _nets(self) -> List[nn.Module]:
        if not self.is_mome:
            return [self.network]
        classifier = [self.network.classifier, self.network.routing] if self.network.classifier is not None else []
        if self.clip_scope == "gate":
            return [self.network.gate, *classifier]
        extra = ([self.network.dispatch] if self.is_plus else []) + classifier
        return [*self.network.experts, self.network.gate, *extra]

    def train_step(self, batch: Dict[str, torch.Tensor], r: float) -> Dict[str, float]:
        image, label = self._to_device(batch["image"]), batch["label"].to(self.device).float()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            if self.is_plus:
                outputs = self.model(image, batch[AVAILABILITY_KEY].to(self.device))
            else:
                outputs = self.model(image)
            if self.precision == "bfloat16":  # the soft Dice sums over whole patches: compute the losses in float32
                outputs = _to_float(outputs)
            if self.is_plus:
                terms = self.loss(outputs, label, r)
            elif self.is_mome:
                terms = self.loss(outputs, label, batch["expert"], r)
            else:
                terms = {"loss": self.single_loss(outputs, label)}
        self.scaler.scale(terms["loss"]).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            for net in self._nets():
                torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: float(v.detach()) for k, v in terms.items()}

    # -- validation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Pooled pseudo-Dice on the fixed validation patches (eval mode, full resolution).

        Per modality for MoME and single U-Nets, per availability pattern for MoME+; with more than two classes the
        Dice of each foreground class is pooled separately and averaged.
        """
        if not self.val_patches or not self.is_main:
            return {}
        self.network.eval()
        counts: Dict[str, np.ndarray] = {}
        for patch in self.val_patches:
            image = self._to_device(patch["image"][None])
            for name, kwargs in self._val_runs(patch):
                with autocast(self.device, self.precision):
                    logits = self.network(image * kwargs.get("mask", 1), **kwargs.get("args", {}))
                prediction = logits.argmax(1)[0].cpu()
                counts[name] = counts.get(name, 0) + _confusion(prediction, patch["label"][0], self.num_classes)
        self.network.train()
        dice = {name: _pooled_dice(c) for name, c in counts.items()}
        dice["mean"] = float(np.mean(list(dice.values())))
        return dice

    def _val_runs(self, patch: Dict[str, object]) -> List[Tuple[str, Dict[str, object]]]:
        """(log name, network call arguments) of each validation pass over one patch."""
        if not self.dropout:
            name = self.modalities[patch["expert"]] if patch["expert"] >= 0 else "unknown"  # type: ignore[operator]
            return [(name, {})]
        present = patch.get(AVAILABILITY_KEY)
        runs = []
        for pattern in self.val_patterns:
            if present is not None and not bool((pattern <= torch.as_tensor(present).float()).all()):
                continue
            c = pattern.to(self.device)
            runs.append(
                (
                    pattern_name(pattern.tolist(), self.modalities),
                    # a plain U-Net (modality_dropout) sees the zero-filled channels only
                    {"mask": c[None, :, None, None, None], "args": {"availability": c[None]} if self.is_plus else {}},
                )
            )
        return runs

    # -- loop -------------------------------------------------------------------------------------------------------
    def _epoch(self, epoch: int, bar_desc: str) -> Dict[str, float]:
        lr = poly_lr(self.initial_lr, epoch, self.epochs, self.poly_exponent)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a param group may scale the schedule (see routing_groups)
        warming_up = epoch < self.gate_warmup_epochs
        if self.is_mome:
            self.network.experts.requires_grad_(not warming_up)
        r = 1.0 if warming_up else (epoch - self.gate_warmup_epochs) / (self.epochs - self.gate_warmup_epochs)
        sums: Dict[str, float] = {}
        steps = range(epoch * self.iterations_per_epoch, (epoch + 1) * self.iterations_per_epoch)
        if self.max_iterations is not None:
            steps = range(steps.start, min(steps.stop, self.max_iterations))
        bar = _progress(steps, bar_desc, self.progress and self.is_main)
        batches = self.sampler.batches(steps, self.loader_threads, pin_memory=self.device.type == "cuda")
        with contextlib.closing(batches):
            for _, batch in zip(bar, batches):
                terms = self.train_step(batch, r)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{terms['loss']:.3f}")
        if self.world_size > 1:  # the epoch's mean loss terms over all replicas
            names = sorted(sums)
            total = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            sums = {k: float(v) / self.world_size for k, v in zip(names, total.tolist())}
        n = max(len(steps), 1)
        record = {"epoch": epoch, "r": r, "lr": lr, **{k: v / n for k, v in sums.items()}, "iterations": len(steps)}
        return {**record, "gate_warmup": True} if warming_up else record

    def run(self) -> List[Dict[str, object]]:
        """Trains until ``epochs`` (or ``max_iterations``); returns the per-epoch history."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.load_checkpoint():
            self._log(f"resumed from {self._checkpoint_path()} at epoch {self.start_epoch}")
        elif self.classifier_warmup_steps:
            self.warm_up_classifier()
        self.network.train()
        for epoch in range(self.start_epoch, self.epochs):
            if self.max_iterations is not None and epoch * self.iterations_per_epoch >= self.max_iterations:
                break
            started = time.time()
            record = self._epoch(epoch, f"epoch {epoch + 1}/{self.epochs}")
            record["val_dice"] = self.validate()
            record["seconds"] = round(time.time() - started, 2)
            self._track_best(record)
            self.history.append(record)
            if self.is_main:
                self.save_checkpoint(epoch + 1)
                with open(self.output_dir / LOG, "a") as log:
                    log.write(json.dumps(record) + "\n")
                self._log(_format(record, self.epochs))
        if self.is_main:
            _atomic_save(self.network.state_dict(), self.output_dir / "model_final.pt")
            if not (self.output_dir / MODEL).is_file():
                _atomic_save(self.network.state_dict(), self.output_dir / MODEL)
        if self.world_size > 1:
            dist.barrier()  # no replica leaves (and tears the process group down) before rank 0 has written
        return self.history

    def warm_up_classifier(self) -> List[float]:
        """Trains the modality classifier alone (see ``classifier_warmup_steps``); returns the per-step losses."""
        classifier = self.network.classifier
        classifier.train()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=self.classifier_warmup_lr)
        losses = []
        for step in _progress(range(self.classifier_warmup_steps), "modality classifier", self.progress):
            # 4 whole training batches per step: every replica trains the same copy, so none needs a gradient sync
            parts = [self.sampler.batch(step * 4 + j, whole=True) for j in range(4)]
            batch = {key: torch.cat([part[key] for part in parts]) for key in ("image", "expert")}
            known = batch["expert"] != UNKNOWN_MODALITY
            if not bool(known.any()):
                continue
            logits = classifier(self._to_device(batch["image"][known]))
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["expert"][known].to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        tail = losses[-25:] or [math.nan]
        self._log(
            f"modality classifier warm-up: {len(losses)} steps, cross-entropy {sum(tail) / len(tail):.4f} (last 25)"
        )
        return losses

    def _log(self, message: str) -> None:
        if self.is_main:
            _log(message)

    def _track_best(self, record: Dict[str, object]) -> None:
        dice = record["val_dice"]
        if not dice:
            return
        mean = float(dice["mean"])  # type: ignore[index]
        self.ema_dice = mean if self.ema_dice is None else 0.9 * self.ema_dice + 0.1 * mean
        record["ema_dice"] = self.ema_dice
        if self.ema_dice > self.best_ema:
            self.best_ema = self.ema_dice
            record["best"] = True
            _atomic_save(self.network.state_dict(), self.output_dir / MODEL)


def default_loader_threads(device: torch.device) -> int:
    """Background batch threads for ``device``: 0 on the CPU; on a GPU 4, or fewer with fewer cores per process."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def distributed_context() -> Tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to_float(outputs: object) -> object:
    """``outputs`` (a tensor, or a dict/list/tuple of them, nested) with every floating tensor cast to float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: _to_float(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(value) for value in outputs)
    return outputs


def _atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _progress(steps: range, desc: str, enabled: bool):
    if not enabled:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _format(record: Dict[str, object], epochs: int) -> str:
    stage = "gate warm-up" if record.get("gate_warmup") else f"r={record['r']:.3f}"
    parts = [f"epoch {int(record['epoch']) + 1}/{epochs}", stage, f"lr={record['lr']:.2e}"]
    parts.append(f"loss={record.get('loss', math.nan):.4f}")
    if "expert" in record:
        parts.append(f"(expert {record['expert']:.4f} x{record['weight']:.3f}, fused {record['fused']:.4f})")
    if "routing" in record:
        parts.append(f"gate routing {record['routing']:.4f}")
    if "modality" in record:
        parts.append(f"modality CE {record['modality']:.4f}")
    dice = record.get("val_dice") or {}
    if dice:
        parts.append("val Dice " + " ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    if "ema_dice" in record:
        parts.append(f"ema {record['ema_dice']:.3f}" + (" *" if record.get("best") else ""))
    parts.append(f"{record['seconds']:.0f} s")
    return " | ".join(parts)


def bf16_training_hazard(network: nn.Module, patch_size: Sequence[int]) -> str | None:
    """Why bfloat16 autocast must not train ``network`` on ``patch_size`` patches on a CPU, or None.

    PyTorch 2.13's CPU bfloat16 weight gradient of a 3x3x3 ``Conv3d`` is wrong when the input is 2 voxels deep
    (first spatial axis): repeated identical backward passes return different values, some of them garbage (seen up
    to 1e33). That depth arises in a U-Net stage whose patch size divided by the strides so far is 2 along that axis.
    The classifier mirrors the U-Nets' strides, so the U-Nets' stages cover it.
    """
    for module in network.modules():
        if not isinstance(module, PlainConvUNet):
            continue
        size = [int(p) for p in patch_size]
        for stage, stride in enumerate(module.strides):
            size = [extent // step for extent, step in zip(size, stride)]
            if size[0] == 2:
                return (
                    f"stage {stage} sees {tuple(size)} voxels of a {tuple(patch_size)} patch, and the CPU bfloat16 "
                    "weight gradient of a Conv3d over an input 2 voxels deep is unreliable"
                )
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_unet(in_channels: int, num_classes: int, **topology) -> PlainConvUNet:
    """A deep-supervised plain U-Net (expert or universal baseline) from a topology dict."""
    return PlainConvUNet(in_channels, num_classes, deep_supervision=True, **topology)


def cache_cases(datalist: Sequence[Dict[str, object]], preprocessing: Compose) -> List[Dict[str, object]]:
    """Applies the deterministic preprocessing once and keeps the cases in memory (with their metadata fields)."""
    cached = []
    for item in datalist:
        data = preprocessing(dict(item))
        case = {**item, "image": torch.as_tensor(data["image"]), "label": torch.as_tensor(data["label"])}
        if AVAILABILITY_KEY in data:
            case[AVAILABILITY_KEY] = torch.as_tensor(data[AVAILABILITY_KEY]).float()
        cached.append(case)
    return cached


def _confusion(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """``(K, 3)`` true positives, false positives, false negatives of each foreground class (whole lesion if binary)."""
    rows = []
    for cls in range(1, max(num_classes, 2)):
        p, t = prediction == cls, truth == cls
        rows.append([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()])
    return np.array(rows, dtype=np.int64)


def _pooled_dice(counts: np.ndarray) -> float:
    """Mean over classes of the pooled Dice ``2 TP / (2 TP + FP + FN)`` (0 for a class never present nor predicted)."""
    dice = [2 * tp / max(2 * tp + fp + fn, 1) for tp, fp, fn in counts.tolist()]
    return float(np.mean(dice))
