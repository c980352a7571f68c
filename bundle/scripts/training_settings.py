"""The settings of :class:`scripts.training.Trainer`, in groups: schedule, optimisation, data loading, validation,
checkpointing and runtime.

Each group is a frozen dataclass whose field names are the trainer's historical keyword arguments, so the configs
build them from the same config ids as before (``"epochs": "@epochs"`` in ``train#trainer#schedule``), and
:func:`group_settings` sorts a flat ``name=value`` mapping into the groups (``Trainer.from_options``). Defaults are
nnU-Net's and the authors' recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence

import torch

__all__ = [
    "Checkpointing",
    "DataLoading",
    "Optimisation",
    "Runtime",
    "Schedule",
    "Validation",
    "group_settings",
]


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: nnU-Net's poly schedule and the optional warm-up phases.

    Args:
        epochs: epochs of the run (the poly learning rate and the curriculum progress ``r`` run over them).
        iterations_per_epoch: training steps per epoch.
        initial_lr: learning rate of epoch 0; epoch ``e`` uses ``initial_lr * (1 - e / epochs) ** poly_exponent``.
        poly_exponent: exponent of nnU-Net's poly schedule.
        max_iterations: stop after this many iterations in total (for smoke tests and budgets); ``None`` = all.
        gate_warmup_epochs: MoME only. Train only the gate, on the fused loss, for this many first epochs, with the
            experts frozen (their forward runs without autograd, so an iteration costs about half); the curriculum
            then runs over the remaining epochs (``r = (epoch - warm-up) / (epochs - warm-up)``). 0 (default) is the
            authors' recipe. Why: the gate's weights are raw, not softmax-normalised, so at initialisation the fused
            output is a random signed mix of expert logits (pseudo-Dice 0.02 with five trained experts), and the
            curriculum gives the fused loss almost no weight while ``r`` is small; short CPU schedules never recover.
        classifier_warmup_steps: MoME with a modality classifier only. Before the first epoch, train the classifier
            alone for this many steps (Adam, ``classifier_warmup_lr``, cross-entropy against the samples' modality,
            on the training sampler's batches): inside the joint loss at lr 1e-3 it stayed at chance for 100
            iterations, so the gate's prior carried no information.
        classifier_warmup_lr: learning rate of that warm-up.
    """

    epochs: int = 800
    iterations_per_epoch: int = 250
    initial_lr: float = 1e-3
    poly_exponent: float = 0.9
    max_iterations: int | None = None
    gate_warmup_epochs: int = 0
    classifier_warmup_steps: int = 0
    classifier_warmup_lr: float = 3e-3


@dataclass(frozen=True)
class Optimisation:
    """The loss and the gradient step (the optimizer itself is built by the config).

    Args:
        curriculum: MoME+ only: apply the curriculum ``L = (1 - r)^p L_expert + (1 - (1 - r)^p) L_fused``;
            ``False`` trains on the fused loss alone, as the authors' committed code does (see
            :class:`scripts.losses.MoMEPlusLoss`).
        curriculum_exponent, expert_reduction: see :class:`scripts.losses.MoMELoss`.
        gate_routing_weight: MoME only. Weight of the gate routing prior of :class:`scripts.losses.MoMELoss` (our
            extension; 0, the default, is the authors' loss).
        grad_clip: max gradient norm (``None``/0 disables).
        clip_scope: ``"all"`` clips each network separately (our default), ``"gate"`` only the gate (upstream).
    """

    curriculum: bool = True
    curriculum_exponent: float = 2.0
    expert_reduction: str = "sum"
    gate_routing_weight: float = 0.0
    grad_clip: float | None = 12.0
    clip_scope: str = "all"

    def __post_init__(self) -> None:
        if self.clip_scope not in ("all", "gate"):
            raise ValueError(f"clip_scope must be 'all' or 'gate', got {self.clip_scope!r}.")


@dataclass(frozen=True)
class DataLoading:
    """How training batches are drawn (see :class:`scripts.sampling.PatchSampler`).

    Args:
        batch_size: samples per batch; with data-parallel training the global batch, split evenly over processes.
        foreground_fraction: nnU-Net's foreground oversampling.
        augmentation: MONAI dictionary transform for training patches.
        seed: base seed of all sampling.
        loader_threads: background threads that sample and augment the next batches while the network trains on the
            current one (see :meth:`scripts.sampling.PatchSampler.batches`; the batches are identical either way).
            ``None`` (default): :func:`scripts.training.default_loader_threads`, i.e. none on the CPU, where the step
            already uses every core and the augmentation is about 1 % of it, and up to 4 with a GPU, where it would
            otherwise dominate the step.
        modality_dropout: a plain multi-channel U-Net trained like MoME+ (random availability per sample, dropped
            channels zero-filled; validation per availability pattern): the MoME+ benchmark's baseline.
    """

    batch_size: int = 2
    foreground_fraction: float = 0.33
    augmentation: Callable | None = None
    seed: int = 0
    loader_threads: int | None = None
    modality_dropout: bool = False


@dataclass(frozen=True)
class Validation:
    """The per-epoch pseudo-Dice.

    Args:
        val_cases: cached cases for the per-epoch pseudo-Dice (may be empty: no validation, ``model.pt`` is the last
            network).
        val_patterns: MoME+ and modality dropout: the availability patterns validated (0/1 vectors); ``None``: all
            modalities, then each one alone.
    """

    val_cases: Sequence[Dict[str, object]] = field(default=(), repr=False)
    val_patterns: Sequence[Sequence[int]] | None = None


@dataclass(frozen=True)
class Checkpointing:
    """Where the run's files go and whether it resumes.

    Args:
        output_dir: where ``checkpoint_latest.pt``, ``model.pt``, ``model_final.pt`` and ``train_log.jsonl`` go.
        resume: continue from ``output_dir/checkpoint_latest.pt`` when it exists.
    """

    output_dir: str
    resume: bool = True


@dataclass(frozen=True)
class Runtime:
    """Device, numeric precision and memory layout, and the progress display.

    Args:
        device: torch device; AMP (``torch.autocast`` + ``GradScaler``) is used on CUDA when ``amp``.
        amp: mixed precision on CUDA.
        cpu_bf16: on a CPU that computes bfloat16 natively (AVX512-BF16/AMX, see
            :func:`scripts.profiles.cpu_has_native_bf16`), run the forward passes under bfloat16 autocast and the
            losses on float32 logits; no loss scaling is needed (bf16 has float32's exponent range) and the weights and
            optimiser stay float32. Ignored on CUDA and on other CPUs, where bf16 is emulated and slower than float32.
            A 64^3 expert step (batch 2, two threads) took 0.38 s against 0.65 s in float32 on an AVX512-BF16 EPYC.
            Not taken where a U-Net stage would see a patch 2 voxels deep (see
            :func:`scripts.training.bf16_training_hazard`).
        channels_last: use the channels-last 3-D memory layout on CPU (about 20 % faster convolutions here).
        progress: show a progress bar per epoch.
    """

    device: str | torch.device = "cpu"
    amp: bool = True
    cpu_bf16: bool = False
    channels_last: bool = True
    progress: bool = True


GROUPS = {
    "schedule": Schedule,
    "optimisation": Optimisation,
    "data_loading": DataLoading,
    "validation": Validation,
    "checkpointing": Checkpointing,
    "runtime": Runtime,
}


def group_settings(**settings: object) -> Dict[str, object]:
    """Sorts flat trainer settings (``epochs=4, seed=3, ...``) into their groups.

    Args:
        settings: any fields of the groups, by name; ``output_dir`` is required (:class:`Checkpointing`).

    Returns:
        ``{"schedule": Schedule(...), "optimisation": ..., ...}``: one instance of every group (defaults for the
        fields not given), keyed by the :class:`scripts.training.Trainer` argument it is passed as.

    Raises:
        TypeError: a name is not a field of any group.
    """
    owner = {f.name: group for group, kind in GROUPS.items() for f in dataclasses.fields(kind)}
    unknown = sorted(set(settings) - set(owner))
    if unknown:
        raise TypeError(f"unknown trainer settings, expected names of {sorted(owner)}, got {unknown}.")
    values: Dict[str, Dict[str, object]] = {group: {} for group in GROUPS}
    for name, value in settings.items():
        values[owner[name]][name] = value
    return {group: kind(**values[group]) for group, kind in GROUPS.items()}
