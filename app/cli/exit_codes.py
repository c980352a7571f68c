"""Which error of the API, the operators or the bundle means which exit code (:mod:`app.cli.exit_status`), and how a
command reports it.

* usage error (2): :data:`USAGE_ERRORS`;
* input rejected (3): :func:`rejections`;
* anything else is an internal error (1), reported with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.cli.exit_status import ExitCode
from app.errors import InputRejected, UsageError
from operators import bundle, phi
from operators.dicom_series import SeriesRejected
from operators.limits import LimitExceeded, LimitSettingError
from operators.modality_router import RulesFileError
from operators.output_folder import UnusableOutputFolder
from operators.study import NothingToSegment
from operators.study_loader import ArchiveRejected

__all__ = ["ExitCode", "exit_code_for", "fail", "parse_or_exit_code", "rejections"]

logger = logging.getLogger(__name__)

USAGE_ERRORS: tuple[type[Exception], ...] = (
    UsageError,
    FileNotFoundError,
    UnusableOutputFolder,
    LimitSettingError,
    RulesFileError,
)


def rejections() -> tuple[type[Exception], ...]:
    """The errors that mean "input rejected": the API's, the operators' and the bundle's volume checks."""
    try:
        volume_checks = bundle.rejections()
    except FileNotFoundError:  # no bundle to import: none of its errors can have been raised
        volume_checks = ()
    return (InputRejected, NothingToSegment, LimitExceeded, SeriesRejected, ArchiveRejected, *volume_checks)


def exit_code_for(error: BaseException, rejected: tuple[type[BaseException], ...] = ()) -> ExitCode:
    """The exit code of a failure raised by the API: usage error, rejected input (:func:`rejections` and
    ``rejected``), else internal error. Usage errors are checked first: ``RulesFileError`` and ``LimitSettingError``
    are ``ValueError`` s."""
    if isinstance(error, USAGE_ERRORS):
        return ExitCode.USAGE
    if isinstance(error, (*rejections(), *rejected)):
        return ExitCode.REJECTED
    return ExitCode.INTERNAL


def fail(prog: str, error: BaseException, rejected: tuple[type[BaseException], ...] = ()) -> ExitCode:
    """Prints why the command failed (no patient name or ID: :mod:`operators.phi`) and returns its exit code; an
    internal error logs its traceback. ``rejected``: further error types that mean "input rejected" here."""
    code = exit_code_for(error, rejected)
    if code == ExitCode.INTERNAL:
        logger.error("%s: internal error", prog, exc_info=error)
        print(phi.redact(f"{prog}: internal error: {error}"), file=sys.stderr)
    elif code == ExitCode.REJECTED:
        print(phi.redact(f"{prog}: input rejected: {error}"), file=sys.stderr)
    else:
        print(phi.redact(f"{prog}: {error}"), file=sys.stderr)
    return code


def parse_or_exit_code(
    parser: argparse.ArgumentParser, argv: Sequence[str], known_only: bool = False
) -> argparse.Namespace | tuple[argparse.Namespace, list[str]] | int:
    """``parser.parse_args(argv)`` (``parse_known_args`` with ``known_only``), or the exit code argparse chose for
    ``--help`` (0) or a usage error (2) instead of raising SystemExit."""
    try:
        return parser.parse_known_args(argv) if known_only else parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else ExitCode.USAGE
