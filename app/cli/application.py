"""``python -m app`` (and the MAP's entry point): the Deploy application on a DICOM folder or zip.

Usage::

    python -m app -i IN -o OUT [-m MODEL] [--modalities ...] [--all-series] [--rules RULES.json]
                  [--mode auto|single|plus] [--device cpu|cuda] [--tta] [--profile NAME] [--quiet] [SDK flags]

``-i`` / ``-o`` / ``-m`` default to ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` / ``HOLOSCAN_MODEL_PATH``;
the SDK's own flags (``-l``, ``-w``, ``-t``) pass through untouched. Exit codes: :mod:`app.cli.exit_codes`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.app import AppOptions
from app.app import run_app as run_graph
from app.cli.exit_codes import ExitCode, fail, parse_or_exit_code
from app.cli.options import (
    add_dicom_options,
    add_inference_options,
    add_progress_option,
    app_options,
    bundle_from_argv,
)

__all__ = ["build_parser", "main", "run_app"]

# A segmenter reports input it cannot handle with a ValueError (operators.study.Segmenter): raised in the graph, it
# rejects the input (exit 3). Usage errors that are ValueErrors (RulesFileError, LimitSettingError) are mapped first.
GRAPH_REJECTIONS = (ValueError,)

MODEL_ENV = "HOLOSCAN_MODEL_PATH"


def build_parser() -> argparse.ArgumentParser:
    """MoME's options; the SDK's own flags (``-l``, ``-w``, ``-t``) pass through untouched."""
    parser = argparse.ArgumentParser(
        prog="python -m app", description="The MoME Deploy application: DICOM study in -> DICOM-SEG, SR, report out."
    )
    parser.add_argument("-i", "--input", type=Path, help="DICOM folder or zip (default: $HOLOSCAN_INPUT_PATH, input)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: $HOLOSCAN_OUTPUT_PATH, output)")
    parser.add_argument("-m", "--model", type=Path, help="MoME bundle folder (default: $HOLOSCAN_MODEL_PATH, bundled)")
    add_dicom_options(parser)
    add_inference_options(parser)
    add_progress_option(parser)
    return parser


def run_app(
    source: Path | None,
    out: Path | None,
    model: Path | None = None,
    options: AppOptions | None = None,
    prog: str = "mome-app",
    sdk_args: Sequence[str] = (),
) -> int:
    """Runs the application (:func:`app.app.run_app`); returns its exit code, printing the reason of a failure."""
    try:
        run_graph(source, out, model, options, sdk_args)
    except Exception as error:  # noqa: BLE001 - every failure becomes its exit code (a traceback for internal ones)
        return fail(prog, error, GRAPH_REJECTIONS)
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app``: parse MoME's options, hand the rest to the SDK, run the graph; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bundle_from_argv(argv or [], ("-m", "--model"), default=os.environ.get(MODEL_ENV))
    parsed = parse_or_exit_code(build_parser(), argv, known_only=True)
    if isinstance(parsed, int):
        return parsed
    args, sdk_args = parsed
    return run_app(args.input, args.output, args.model, app_options(args), "python -m app", sdk_args)
