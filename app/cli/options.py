"""Option groups shared by the commands, each defined once: the model, how it runs, and DICOM routing.

Profile names come from the bundle that runs (``scripts.profiles.PROFILES`` through :mod:`operators.bundle`): each
command puts its ``--model`` bundle's scripts on the path (:func:`bundle_from_argv`) before it builds its parser.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from app.app import AppOptions
from operators import phi
from operators.bundle import profile_names, resolve_bundle, use_bundle_scripts
from operators.modality_router import MODALITIES
from operators.study import DEVICES, MODES

__all__ = [
    "add_dicom_options",
    "add_inference_options",
    "add_progress_option",
    "app_options",
    "bundle_from_argv",
    "progress_printer",
]

MODE_HELP = (
    "auto (default): a study's T1/T1ce/T2/FLAIR series go to the bundle's MoME+ model together when it has one and "
    "the study has at least two of them; plus: always MoME+ for those series; single: one MoME run per series"
)
PROFILE_HELP = (
    "inference profile of the bundle (shipped: fast, the default, bfloat16 on CPUs with native bf16; parity, the "
    "authors' tiling in float32; accurate, parity + mirroring)"
)


def bundle_from_argv(
    argv: Sequence[str], flags: Sequence[str] = ("--model",), default: str | None = None
) -> Path | None:
    """Puts the scripts of the bundle named by ``flags`` in ``argv`` (else ``default``, else the installed bundle) on
    the path, so that the parser offers that bundle's profiles; returns the bundle folder, or None when the flag names
    no bundle (the command then reports it)."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # ``--mode`` is not ``--model``
    finder.add_argument(*flags, dest="model", type=Path)
    known, _ = finder.parse_known_args(list(argv))
    model = known.model or (Path(default) if default else None)
    try:
        return use_bundle_scripts(resolve_bundle(model))
    except FileNotFoundError:
        return None


def add_inference_options(parser: argparse.ArgumentParser, tta: bool = True) -> None:
    """``--device``, ``--profile`` (and ``--tta``): how the model runs."""
    parser.add_argument("--device", choices=DEVICES, help="inference device (default: cuda if available)")
    try:
        profiles: tuple[str, ...] | None = profile_names()
    except FileNotFoundError:  # no bundle: the command reports it after parsing (exit 2)
        profiles = None
    parser.add_argument("--profile", choices=profiles, help=PROFILE_HELP)
    if tta:
        parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 passes; slower)")


def add_dicom_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--modalities``, ``--all-series``, ``--rules``, ``--mode``: which series of a DICOM study are segmented."""
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES), help="only these")
    parser.add_argument("--all-series", action="store_true", help="every qualifying series, not one per modality")
    parser.add_argument("--rules", type=Path, help="modality router rules JSON (default: the shipped rules)")
    parser.add_argument("--mode", choices=MODES, default="auto", help=MODE_HELP)


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress lines (:func:`progress_printer`)."""
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def progress_printer(quiet: bool):
    """Progress lines with the elapsed time on stderr (without patient names or IDs), or None when ``quiet``."""
    if quiet:
        return None
    started = time.perf_counter()

    def say(message: str) -> None:
        print(phi.redact(f"[{time.perf_counter() - started:6.1f} s] {message}"), file=sys.stderr, flush=True)

    return say


def app_options(args: argparse.Namespace) -> AppOptions:
    """The application's options from parsed ``add_dicom_options`` / ``add_inference_options`` / ``--quiet``."""
    return AppOptions(
        modalities=args.modalities,
        all_series=args.all_series,
        rules_file=args.rules,
        device=args.device,
        tta=args.tta,
        progress=progress_printer(args.quiet),
        profile=args.profile,
        mode=args.mode,
    )
