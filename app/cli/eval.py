"""``mome-eval``: evaluate a MoME bundle on any labelled NIfTI dataset (the work: :mod:`app.evaluation`).

Usage::

    mome-eval --data DIR --model BUNDLE_DIR [--out results.json] [--predictions PRED_DIR]
              [--device cpu|cuda] [--profile NAME] [--cases CASE_ID ...] [--patterns PATTERN ...]
    python -m app.cli_eval ...

Prints a table of the results (per modality, MoME+: per availability pattern) and writes them to ``--out``.

Exit codes (:mod:`app.cli.exit_codes`): 0 ok, 1 internal error, 2 usage error, 3 input rejected (no cases, a missing
label or prediction, a prediction not on its label's grid; no results file is written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app import evaluation
from app.cli.exit_codes import ExitCode, fail, parse_or_exit_code
from app.cli.options import add_inference_options, bundle_from_argv

__all__ = ["build_parser", "main", "parse_args"]

PROG = "mome-eval"


def build_parser() -> argparse.ArgumentParser:
    """The ``mome-eval`` argument parser (``--profile`` choices: the bundle whose scripts are imported)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a MoME bundle on a labelled NIfTI dataset (Dice, volume error, lesion-wise F1).",
    )
    parser.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="dataset folder (dataset.json or imagesTr/labelsTr)"
    )
    parser.add_argument(
        "--model", required=True, type=Path, metavar="BUNDLE_DIR", help="MoME bundle folder (e.g. made by mome-convert)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="RESULTS_JSON",
        help="results JSON to write; predictions go to <out stem>_predictions/",
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        metavar="PRED_DIR",
        help="skip inference and read <PRED_DIR>/<image stem>_seg.nii.gz instead",
    )
    add_inference_options(parser, tta=False)
    parser.add_argument("--cases", nargs="+", metavar="CASE_ID", help="evaluate only these cases")
    parser.add_argument(
        "--patterns",
        nargs="+",
        metavar="PATTERN",
        default=["all"],
        help="MoME+ datasets: availability patterns to evaluate, 'all' (default) or names like t1ce+flair",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses the arguments; argparse exits with code 2 on usage errors (the folders are checked by the API)."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``mome-eval`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bundle_from_argv(argv)
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        results = evaluation.evaluate(
            args.data,
            args.model,
            out=args.out,
            predictions=args.predictions,
            device=args.device,
            profile=args.profile,
            cases=args.cases,
            patterns=args.patterns,
        )
    except Exception as error:  # noqa: BLE001 - every failure is reported with its exit code
        return fail(PROG, error)
    print(evaluation.format_table(results))
    if args.out is not None:
        print(f"wrote {args.out}")
    return ExitCode.OK
