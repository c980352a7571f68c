"""Checkpoint files of the training stages: expert initialisation, extension, optimiser groups and expert surgery.

* :func:`load_experts` starts a MoME's experts from single-expert ``state_dict`` files (``train_expert.json``).
* :func:`load_extending` loads a MoME saved without the modality classifier into one that has it.
* :func:`routing_groups` gives the classifier's routing layers their own learning-rate scale.
* :func:`extract_experts` / :func:`replace_experts` move experts between a MoME ``state_dict`` and single-expert
  files, so experts can be fine-tuned alone with ``train_expert.json`` and put back. Expert ``k`` is the ``k``-th
  modality of :data:`scripts.networks.MODALITIES`.

Every file is read with ``torch.load(weights_only=True)`` and written atomically (a ``.partial`` file, then a rename).
Command line (from the bundle folder)::

    python -m scripts.checkpoints extract START OUT_DIR t1 t2 ...        # START's experts -> OUT_DIR/<modality>.pt
    python -m scripts.checkpoints replace START OUT t1=PATH t2=PATH ...  # START with those experts -> OUT
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from .datalists import modality_index
from .networks import MODALITIES, MoME, he_init

__all__ = [
    "extract_experts",
    "load_experts",
    "load_extending",
    "main",
    "replace_experts",
    "routing_groups",
]

logger = logging.getLogger(__name__)


def load_experts(network: MoME, checkpoints: Sequence[str], reinit_heads: bool = False, strict: bool = True) -> MoME:
    """Initialises MoME's experts from single-expert ``state_dict`` files (``train_expert.json`` outputs).

    Args:
        network: the MoME whose ``experts[k]`` receives ``checkpoints[k]``.
        checkpoints: one file per expert, in expert order.
        reinit_heads: re-initialise the experts' 1x1x1 heads after loading, as the authors' code does
            (its ``load_pretrained_weights`` skips ``seg_layers``). Off by default: see docs/README.md.
        strict: passed to ``load_state_dict``.

    Returns:
        ``network``, loaded in place.
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
    fine-tune; with Adam each step moves them by about the learning rate, hence the scale (the trainer multiplies
    each group's scheduled learning rate by its ``lr_scale``).

    Args:
        network: a MoME (any module; parameters named ``routing.*`` form the scaled group).
        routing_lr_scale: learning-rate factor of the routing layers.

    Returns:
        Two parameter groups for a ``torch.optim`` optimizer.
    """
    routing = [p for name, p in network.named_parameters() if name.startswith("routing.")]
    others = [p for name, p in network.named_parameters() if not name.startswith("routing.")]
    return [{"params": others}, {"params": routing, "lr_scale": float(routing_lr_scale)}]


def load_extending(network: MoME, path: str) -> MoME:
    """Loads a MoME state dict saved without the modality classifier into ``network`` that has one.

    The classifier and the routing layers keep their initialisation; the routing layers start at zero, so the loaded
    network computes exactly what the saved one did until training moves them. Any other difference is an error.

    Args:
        network: a MoME built with ``modality_classifier=True`` (or without: then it is a strict load).
        path: the saved ``state_dict``.

    Returns:
        ``network``, loaded in place.

    Raises:
        KeyError: a key other than the classifier's or routing's is missing, or the file has unexpected keys.
        ValueError: a tensor's shape differs from the network's.
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


def _atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path.partial``, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _expert_prefix(modality: str) -> str:
    """``"experts.<k>."``, the state-dict prefix of ``modality``'s expert in MoME's expert order."""
    index = modality_index(modality, MODALITIES)
    if index < 0:
        raise ValueError(f"unknown modality, expected one of {list(MODALITIES)}, got {modality!r}.")
    return f"experts.{index}."


def _expert_state(state: Mapping[str, torch.Tensor], modality: str, source: Path) -> Dict[str, torch.Tensor]:
    """The tensors of ``modality``'s expert in a MoME ``state``, keys without the ``experts.<k>.`` prefix."""
    prefix = _expert_prefix(modality)
    expert = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not expert:
        raise KeyError(f"{modality}: {source} has no {prefix}* tensors (not a MoME state dict?).")
    return expert


def extract_experts(start: Path, modalities: Sequence[str], out_dir: Path) -> Dict[str, Path]:
    """Writes the experts of a MoME ``state_dict`` as single-expert files ``out_dir/<modality>.pt``.

    The files load into :class:`scripts.unet.PlainConvUNet` (e.g. as ``train_expert.json``'s starting point) and back
    into a MoME with :func:`load_experts` or :func:`replace_experts`.

    Args:
        start: a MoME ``state_dict`` file (``model.pt``).
        modalities: the experts to extract, by modality (case-insensitive; files are named in lower case).
        out_dir: folder of the expert files (created when missing).

    Returns:
        Each modality's file.

    Raises:
        ValueError: a modality is not one of :data:`scripts.networks.MODALITIES`.
        KeyError: ``start`` has no expert for a modality.
    """
    for modality in modalities:
        _expert_prefix(modality)  # every name is checked before anything is read or written
    state = torch.load(start, map_location="cpu", weights_only=True)
    written: Dict[str, Path] = {}
    for modality in modalities:
        expert = _expert_state(state, modality, start)
        path = Path(out_dir) / f"{modality.lower()}.pt"
        _atomic_save(expert, path)
        written[modality] = path
        logger.info("extracted %s* (%s): %d tensors -> %s", _expert_prefix(modality), modality, len(expert), path)
    return written


def replace_experts(start: Path, experts: Mapping[str, Path], out: Path) -> Path:
    """Writes ``start`` with the given experts' ``state_dict`` s put in place of its own to ``out``.

    Args:
        start: a MoME ``state_dict`` file.
        experts: single-expert ``state_dict`` file of each modality to replace (e.g. ``train_expert.json``'s
            ``model.pt``); the other experts, the gate and everything else are kept.
        out: output file (may be ``start``: it is replaced atomically).

    Returns:
        ``out``.

    Raises:
        ValueError: a modality is not one of :data:`scripts.networks.MODALITIES`, or a tensor's shape differs.
        KeyError: an expert file's keys differ from that expert's keys in ``start`` (the message names the modality).
    """
    for modality in experts:
        _expert_prefix(modality)
    state = torch.load(start, map_location="cpu", weights_only=True)
    for modality, path in experts.items():
        prefix = _expert_prefix(modality)
        current = _expert_state(state, modality, start)
        expert = torch.load(path, map_location="cpu", weights_only=True)
        if sorted(current) != sorted(expert):
            missing, extra = sorted(set(current) - set(expert)), sorted(set(expert) - set(current))
            raise KeyError(
                f"{modality}: the keys of {path} differ from {start}'s {prefix}*, got {len(missing)} missing "
                f"(e.g. {missing[:2]}) and {len(extra)} unexpected (e.g. {extra[:2]})."
            )
        for key, value in expert.items():
            if value.shape != current[key].shape:
                expected = tuple(current[key].shape)
                raise ValueError(f"{modality}: {key!r} of {path} has shape {tuple(value.shape)}, {start} {expected}.")
        state.update({prefix + key: value for key, value in expert.items()})
        logger.info("replaced %s* (%s): %d tensors from %s", prefix, modality, len(expert), path)
    _atomic_save(state, Path(out))
    logger.info("wrote %s", out)
    return Path(out)


def _modality_paths(pairs: Sequence[str]) -> Dict[str, Path]:
    """``{"t1": Path("a.pt")}`` from ``["t1=a.pt"]``; refuses a pair without ``=`` and a modality given twice."""
    experts: Dict[str, Path] = {}
    for pair in pairs:
        modality, sep, path = pair.partition("=")
        if not sep or not modality or not path:
            raise ValueError(f"expected MODALITY=PATH, got {pair!r}.")
        if modality.lower() in experts:
            raise ValueError(f"modality {modality!r} given twice, got {list(pairs)}.")
        experts[modality.lower()] = Path(path)
    return experts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.checkpoints",
        description="Move experts between a MoME state dict and single-expert state dicts.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser("extract", help="START's experts -> OUT_DIR/<modality>.pt")
    extract.add_argument("start", type=Path, help="MoME state dict (model.pt)")
    extract.add_argument("out_dir", type=Path, help="folder of the expert files")
    extract.add_argument("modalities", nargs="+", help=f"experts to extract, of {', '.join(MODALITIES)}")
    replace = commands.add_parser("replace", help="START with the given experts put in place -> OUT")
    replace.add_argument("start", type=Path, help="MoME state dict (model.pt)")
    replace.add_argument("out", type=Path, help="output state dict")
    replace.add_argument("experts", nargs="+", metavar="MODALITY=PATH", help="single-expert state dict per modality")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit code.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 on success, 1 when an input is refused (the reason is printed to stderr).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "extract":
            extract_experts(args.start, args.modalities, args.out_dir)
        else:
            replace_experts(args.start, _modality_paths(args.experts), args.out)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        print(f"scripts.checkpoints {args.command}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
