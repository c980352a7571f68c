"""``mome-seg``: segment brain lesions in a native-space MR volume or a DICOM study; results on the input's own grid.

Usage::

    mome-seg INPUT.nii.gz -o OUTDIR [--modality t1|t1ce|t2|flair|dwi] [--model BUNDLE_DIR] [--tta] [--save-mni]
             [--profile NAME] [--device cpu|cuda] [--quiet]
    mome-seg DICOM_DIR_OR_ZIP -o OUTDIR [--modalities t1 flair ...] [--all-series] [--rules RULES.json]
             [--mode auto|single|plus] [...]

NIfTI input runs :func:`app.api.segment_nifti`: ``OUTDIR/<name>_seg.nii.gz`` (uint8, the input's shape and affine),
``OUTDIR/<name>_qc.png`` (orthogonal slices through the largest lesion, radiological convention), ``OUTDIR/report.json``
(modality, lesion volume in mL, lesion count, largest lesion, registration quality with warnings, timings, model)
and, with ``--save-mni``, the registered image and its segmentation on the model's MoME-space grid. MoME needs no
modality label; ``--modality`` (default: guessed from a ``_t1``/``_flair``... file-name suffix) picks the
registration template's contrast and is recorded in the report.

DICOM input (a folder tree or a zip, several studies allowed) runs the Deploy application's graph (the same as
``python -m app``): per study ``OUTDIR/<StudyInstanceUID>/`` with a DICOM-SEG, an SR and a QC image per segmented
series and ``report.json`` (every routing decision with its reason). With a MoME+ model in the bundle (``--mode``),
the T1/T1ce/T2/FLAIR series of a study are co-registered and segmented together into tumour sub-regions.

Output folder: checked before anything is read (an existing file, or a folder that cannot be written or created, is a
usage error). Results are staged beside it and moved in file by file. Its hidden ``.mome-manifest.json`` lists the
files MoME wrote and the input each came from: a re-run of an input overwrites its files and removes those it no
longer writes (``--save-mni`` dropped); other inputs' results (``report.json`` aside) and other files stay.

Exit codes: :mod:`app.cli.exit_codes` (0 ok, 1 internal error, 2 usage error, 3 input rejected: reason printed,
nothing written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app.api import segment_nifti
from app.cli.application import run_app
from app.cli.exit_codes import ExitCode, fail, parse_or_exit_code
from app.cli.options import (
    add_dicom_options,
    add_inference_options,
    add_progress_option,
    app_options,
    bundle_from_argv,
    progress_printer,
)
from app.nifti_io import is_dicom_input
from operators import phi
from operators.modality_router import MODALITIES

__all__ = ["build_parser", "main"]

PROG = "mome-seg"


def build_parser() -> argparse.ArgumentParser:
    """The ``mome-seg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="NIfTI volume (.nii/.nii.gz), DICOM folder or zip of DICOM files")
    parser.add_argument(
        "-o", "--out", type=Path, required=True, help="output folder (created; a re-run replaces only MoME's files)"
    )
    parser.add_argument("--modality", choices=MODALITIES, help="recorded in the report (MoME does not need it)")
    parser.add_argument("--model", type=Path, help="bundle folder (default: the installed bundle, $MOME_BUNDLE)")
    add_inference_options(parser)
    parser.add_argument("--save-mni", action="store_true", help="also write the image and mask in MoME space")
    add_progress_option(parser)
    add_dicom_options(parser.add_argument_group("DICOM input"))
    return parser


def run(args: argparse.Namespace) -> int:
    """Segments ``args.input`` (NIfTI or DICOM); returns the exit code."""
    if is_dicom_input(args.input):
        return run_app(args.input, args.out, args.model, app_options(args), prog=PROG)
    try:
        segment_nifti(
            args.input,
            args.out,
            model=args.model,
            modality=args.modality,
            device=args.device,
            tta=args.tta,
            profile=args.profile,
            save_mni=args.save_mni,
            progress=progress_printer(args.quiet),
        )
    except Exception as error:  # noqa: BLE001 - every failure becomes its exit code (a traceback for internal ones)
        return fail(PROG, error)
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; usage errors (and ``--help``) return their exit code instead of raising SystemExit."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bundle_from_argv(argv)
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):
        return args
    phi.install()  # no patient name or ID in any log record or warning (operators/phi.py)
    if args.model is not None and not args.model.exists():
        return fail(PROG, FileNotFoundError(f"{args.model}: no such model folder."))
    return run(args)
