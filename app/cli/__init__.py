"""The commands: one module per command, shared option groups (:mod:`app.cli.options`), the exit codes
(:mod:`app.cli.exit_status`) and the one map from errors to them (:mod:`app.cli.exit_codes`).

=============================  ============================  ===================================================
command                        module                        what it does
=============================  ============================  ===================================================
``mome-seg``                   :mod:`app.cli.seg`            NIfTI volume or DICOM study -> segmentation
``python -m app``, the MAP     :mod:`app.cli.application`    the Deploy application (SDK flags, HOLOSCAN_*)
``mome-eval``                  :mod:`app.cli.eval`           a bundle's Dice, volume error, lesion F1 on a dataset
``mome-convert``               :mod:`app.cli.convert`        the authors' checkpoints -> a runnable bundle
``make demo``                  :mod:`app.cli.demo`           the application on the embedded demo study
``python -m app.map_package``  :mod:`app.map_package`        MAP build context, CPU image build and run
=============================  ============================  ===================================================

The console-script functions below import nothing heavy: ``mome-seg`` first becomes a small supervisor
(:mod:`app.cli.supervisor`) that runs the work in a child process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["convert_main", "eval_main", "seg_main"]


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``mome-convert SRC --out BUNDLE_DIR``: the authors' checkpoint folder -> runnable bundle."""
    from app.cli.convert import main

    return main(sys.argv[1:] if argv is None else argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``mome-eval --data DIR --model BUNDLE_DIR``: Dice, volume error and lesion F1 of a bundle on a dataset."""
    from app.cli.eval import main

    return main(sys.argv[1:] if argv is None else argv)


def seg_main(argv: Sequence[str] | None = None) -> int:
    """``mome-seg INPUT -o OUTDIR``: NIfTI volume or DICOM study -> lesion segmentation on the input's grid + report.

    As a console script (``argv`` None) the work runs in a supervised child process, so SIGTERM / SIGINT stop it
    cleanly (:mod:`app.cli.supervisor`: exit 143 / 130, nothing partial left behind).
    """
    from app.cli.supervisor import is_supervised, supervise

    if argv is None and not is_supervised():
        child = "import sys; from app.cli import seg_main; sys.exit(seg_main(sys.argv[1:]))"
        return supervise([sys.executable, "-c", child, *sys.argv[1:]], "mome-seg")
    from app.cli.seg import main

    return main(sys.argv[1:] if argv is None else argv)
