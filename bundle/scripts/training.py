"""Training of MoME experts, joint MoME (curriculum) and plain U-Nets, driven by the bundle's train configs.

The trainer and its loop live here; its settings are grouped in :mod:`scripts.training_settings`, the datalists in
:mod:`scripts.datalists`, the patch samplers in :mod:`scripts.sampling` and the checkpoint helpers in
:mod:`scripts.checkpoints`. The names the configs use as ``scripts.training.X`` are re-exported from those modules.

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
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import _atomic_save, load_experts, load_extending, routing_groups
from .datalists import cache_cases, modality_index, read_datalist, read_plus_datalist, split_by_subject
from .losses import UNKNOWN_MODALITY, MoMELoss, MoMEPlusLoss, nnunet_deep_supervision_loss
from .networks import MODALITIES, MoME, MoMEPlus, PlainConvUNet
from .plus import AVAILABILITY_KEY, pattern_name
from .profiles import autocast, autocast_precision
from .sampling import PatchSampler, PlusPatchSampler, _validation_patches
from .training_settings import (
    Checkpointing,
    DataLoading,
    Optimisation,
    Runtime,
    Schedule,
    Validation,
    group_settings,
)

__all__ = [
    "Checkpointing",
    "DataLoading",
    "Optimisation",
    "PatchSampler",
    "PlusPatchSampler",
    "Runtime",
    "Schedule",
    "Trainer",
    "Validation",
    "bf16_training_hazard",
    "build_unet",
    "cache_cases",
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


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly learning rate for ``epoch`` (0-based)."""
    return initial_lr * (1.0 - epoch / epochs) ** exponent


class Trainer:
    """nnU-Net-style training loop for a MoME (curriculum) or a single U-Net (expert or universal baseline).

    Args:
        network: a :class:`scripts.networks.MoME` (joint training with :class:`scripts.losses.MoMELoss`), a
            :class:`scripts.networks.MoMEPlus` (:class:`scripts.losses.MoMEPlusLoss`, modality dropout) or a
            :class:`scripts.networks.PlainConvUNet` (deep-supervised Dice + CE).
        optimizer: optimizer over all trainable parameters (SGD, Nesterov, momentum 0.99 as upstream); a parameter
            group's ``lr_scale`` scales the scheduled learning rate (see :func:`scripts.checkpoints.routing_groups`).
        train_cases: cached cases (``image``, ``label``, ``modality``) in network axis order, normalised.
        patch_size: training patch size.
        modalities: modality ids in expert order (used for routing and the per-modality log).
        checkpointing: output folder and resume (:class:`scripts.training_settings.Checkpointing`).
        schedule: epochs, iterations, poly learning rate and warm-up phases
            (:class:`~scripts.training_settings.Schedule`).
        optimisation: loss and gradient clipping (:class:`~scripts.training_settings.Optimisation`).
        data_loading: batch size, sampling, augmentation, seed and loader threads
            (:class:`~scripts.training_settings.DataLoading`).
        validation: validation cases and MoME+ availability patterns (:class:`~scripts.training_settings.Validation`).
        runtime: device, precision, memory layout and progress bar (:class:`~scripts.training_settings.Runtime`).

    :meth:`from_options` takes the same settings as flat keyword arguments (``epochs=4, seed=3``).

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
        patch_size: Sequence[int],
        modalities: Sequence[str] = MODALITIES,
        *,
        checkpointing: Checkpointing,
        schedule: Schedule | None = None,
        optimisation: Optimisation | None = None,
        data_loading: DataLoading | None = None,
        validation: Validation | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        schedule = Schedule() if schedule is None else schedule
        optimisation = Optimisation() if optimisation is None else optimisation
        loading = DataLoading() if data_loading is None else data_loading
        validation = Validation() if validation is None else validation
        runtime = Runtime() if runtime is None else runtime
        self.device = torch.device(runtime.device)
        self.rank, self.world_size = distributed_context()
        self.network = network.to(self.device)
        self.is_mome = isinstance(network, MoME)
        self.is_plus = isinstance(network, MoMEPlus)
        epochs, gate_warmup_epochs = schedule.epochs, schedule.gate_warmup_epochs
        if gate_warmup_epochs and not (self.is_mome and 0 <= gate_warmup_epochs < epochs):
            raise ValueError(f"gate_warmup_epochs={gate_warmup_epochs} needs a MoME and fewer than epochs={epochs}.")
        self.gate_warmup_epochs = int(gate_warmup_epochs)
        self.channels_last = runtime.channels_last and self.device.type == "cpu"
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)
        self.optimizer = optimizer
        self.modalities = [m.lower() for m in modalities]
        self.train_cases = self._with_expert(train_cases)
        val_cases = validation.val_cases
        self.val_patches = _validation_patches(self._with_expert(val_cases), patch_size) if val_cases else []
        self.dropout = self.is_plus or loading.modality_dropout
        sampler = PlusPatchSampler if self.dropout else PatchSampler
        shard = {"rank": self.rank, "world_size": self.world_size}
        self.sampler = sampler(
            self.train_cases, patch_size, loading.batch_size, loading.foreground_fraction, loading.augmentation,
            loading.seed, **shard,
        )  # fmt: skip
        self.num_classes = int(network.num_classes if self.is_mome else network.out_channels)
        self.val_patterns = self._val_patterns(validation.val_patterns) if self.dropout else []
        self.loss, self.single_loss = self._losses(network, optimisation)
        self.output_dir = Path(checkpointing.output_dir)
        self.epochs, self.iterations_per_epoch = epochs, schedule.iterations_per_epoch
        self.initial_lr, self.poly_exponent = schedule.initial_lr, schedule.poly_exponent
        self.grad_clip, self.clip_scope = optimisation.grad_clip, optimisation.clip_scope
        self.precision = autocast_precision(self.device, runtime.amp, runtime.cpu_bf16)
        hazard = bf16_training_hazard(network, patch_size) if self.precision == "bfloat16" else None
        if hazard:
            _log(f"cpu_bf16 ignored, training in float32: {hazard}")
            self.precision = "float32"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "float16")
        self.resume, self.progress = checkpointing.resume, runtime.progress
        self.max_iterations = schedule.max_iterations
        if schedule.classifier_warmup_steps and getattr(network, "classifier", None) is None:
            raise ValueError("classifier_warmup_steps needs a MoME with a modality classifier.")
        self.classifier_warmup_steps = int(schedule.classifier_warmup_steps)
        self.classifier_warmup_lr = schedule.classifier_warmup_lr
        self.start_epoch, self.ema_dice, self.best_ema, self.history = 0, None, -1.0, []
        threads = loading.loader_threads
        self.loader_threads = default_loader_threads(self.device) if threads is None else int(threads)
        self.model = self._data_parallel()

    @classmethod
    def from_options(
        cls,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_cases: Sequence[Dict[str, object]],
        val_cases: Sequence[Dict[str, object]],
        patch_size: Sequence[int],
        output_dir: str,
        modalities: Sequence[str] = MODALITIES,
        **options: object,
    ) -> Trainer:
        """A trainer from flat settings, e.g. ``Trainer.from_options(net, opt, train, val, (16,) * 3, out, epochs=4)``.

        Args:
            network, optimizer, train_cases, patch_size, modalities: as for :class:`Trainer`.
            val_cases: :attr:`scripts.training_settings.Validation.val_cases`.
            output_dir: :attr:`scripts.training_settings.Checkpointing.output_dir`.
            options: any other field of the setting groups, by name
                (see :func:`scripts.training_settings.group_settings`).

        Raises:
            TypeError: an option is not a field of any group.
        """
        groups = group_settings(val_cases=val_cases, output_dir=output_dir, **options)
        return cls(network, optimizer, train_cases, patch_size, modalities, **groups)

    def _losses(self, network: nn.Module, optimisation: Optimisation) -> Tuple[nn.Module | None, object]:
        """``(MoME or MoME+ loss, single U-Net loss)``; the one that does not apply is ``None``."""
        levels = self._levels(network)
        o = optimisation
        if self.is_plus:
            loss = MoMEPlusLoss(levels, o.curriculum_exponent, o.expert_reduction, o.curriculum, self.world_size)
        else:
            mome_loss = MoMELoss(
                levels, o.curriculum_exponent, o.expert_reduction, o.gate_routing_weight, replicas=self.world_size
            )
            loss = mome_loss if self.is_mome else None
        return loss, None if self.is_mome else nnunet_deep_supervision_loss(levels)

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
        """``cases`` with ``expert``, the index of their modality in :attr:`modalities` (``-1`` if unknown)."""
        return [{**c, "expert": modality_index(str(c.get("modality", "")), self.modalities)} for c in cases]

    @staticmethod
    def _levels(network: nn.Module) -> int:
        """Deep-supervision levels (decoder stages) of a MoME's gate or a U-Net."""
        unet = network.gate if isinstance(network, MoME) else network
        return len(unet.decoder)

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        """``output_dir/checkpoint_latest.pt``."""
        return self.output_dir / CHECKPOINT

    def save_checkpoint(self, next_epoch: int) -> None:
        """Atomically writes the resumable state (network, optimizer, scaler, EMA, history) for ``next_epoch``."""
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
        """Restores :meth:`save_checkpoint`'s state when resuming and it exists; returns whether it did."""
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
        """``tensor`` on the training device (asynchronous copy), channels-last 3-D when that layout is used."""
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else tensor

    def _nets(self) -> List[nn.Module]:
        """The networks whose gradient norms are clipped separately (see ``clip_scope``)."""
        if not self.is_mome:
            return [self.network]
        classifier = [self.network.classifier, self.network.routing] if self.network.classifier is not None else []
        if self.clip_scope == "gate":
            return [self.network.gate, *classifier]
        extra = ([self.network.dispatch] if self.is_plus else []) + classifier
        return [*self.network.experts, self.network.gate, *extra]

    def train_step(self, batch: Dict[str, torch.Tensor], r: float) -> Dict[str, float]:
        """One optimizer step on ``batch`` at curriculum progress ``r``; returns the loss terms as floats."""
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
        """Trains one epoch (learning rate, warm-up freezing, steps); returns its record (mean loss terms)."""
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
        """:func:`_log` on the main process only."""
        if self.is_main:
            _log(message)

    def _track_best(self, record: Dict[str, object]) -> None:
        """Updates the EMA of the validation Dice and writes ``model.pt`` when it improves (marks ``record``)."""
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


def _progress(steps: range, desc: str, enabled: bool):
    """``steps`` wrapped in a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _format(record: Dict[str, object], epochs: int) -> str:
    """One human-readable log line for an epoch record."""
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
    """Writes a progress line to stderr (the trainer's log; ``train_log.jsonl`` holds the records)."""
    print(message, file=sys.stderr, flush=True)


def build_unet(in_channels: int, num_classes: int, **topology) -> PlainConvUNet:
    """A deep-supervised plain U-Net (expert or universal baseline) from a topology dict."""
    return PlainConvUNet(in_channels, num_classes, deep_supervision=True, **topology)


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
