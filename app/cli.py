"""Console-script entry points (thin wrappers over the bundle's Python API)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from app.bundle_path import use_bundle_scripts

__all__ = ["convert_main", "eval_main", "seg_main"]


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``mome-convert SRC --out BUNDLE_DIR``: the authors' checkpoint folder -> runnable bundle."""
    use_bundle_scripts()
    from scripts.convert_upstream import main

    return main(sys.argv[1:] if argv is None else argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``mome-eval --data DIR --model BUNDLE_DIR``: Dice, volume error and lesion F1 of a bundle on a dataset.

    Unlike argparse's default, usage errors (and ``--help``) return their exit code instead of raising SystemExit.
    """
    from app.cli_eval import parse_args, run

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    use_bundle_scripts(args.model)
    return run(args)


def seg_main(argv: Sequence[str] | None = None) -> int:
    """``mome-seg INPUT -o OUTDIR``: native-space NIfTI -> lesion mask on the same grid + report.

    As a console script (``argv`` None) the work runs in a supervised child process, so SIGTERM / SIGINT stop it
    cleanly (``app.supervisor``: exit 143 / 130, nothing partial left behind).
    """
    from app.supervisor import is_supervised, supervise

    if argv is None and not is_supervised():
        child = "import sys; from app.cli import seg_main; sys.exit(seg_main(sys.argv[1:]))"
        return supervise([sys.executable, "-c", child, *sys.argv[1:]], "mome-seg")
    from app.cli_seg import main

    return main(sys.argv[1:] if argv is None else argv)
