"""``mome-seg``: segment brain lesions in a native-space MR volume or DICOM study; results on the input's own grid.

Usage::

    mome-seg INPUT.nii.gz -o OUTDIR [--modality t1|t1ce|t2|flair|dwi] [--model BUNDLE_DIR] [--tta] [--save-mni]
             [--profile fast|parity|accurate] [--device cpu|cuda] [--quiet]
    mome-seg DICOM_DIR_OR_ZIP -o OUTDIR [--modalities t1 flair ...] [--all-series] [--rules RULES.json]
             [--mode auto|single|plus] [...]

DICOM input (a folder tree or a zip, several studies allowed) runs the Deploy application's graph (``app/app.py``,
the same as ``python -m app``): the modality router
(``operators/modality_rules.json``), one series per modality (or ``--all-series``), and writes per study
``OUTDIR/<StudyInstanceUID>/seg_<SeriesInstanceUID>.dcm`` (DICOM-SEG on the series' exact grid) and ``report.json``
(every routing decision with its reason; volumes, counts, registration quality, timings, SEG UIDs). With a MoME+
model in the bundle (``--mode``), the T1/T1ce/T2/FLAIR series of a study are co-registered and segmented together
into tumour sub-regions on the finest of them; that SEG references every contributing series.

Steps: affine registration to the MNI152 2009a template (ITK), resampling into brain-masked MoME space, MoME
inference with the bundle's inferer, class probabilities mapped back through the inverse transform and argmax on the
input grid. Writes ``OUTDIR/<name>_seg.nii.gz`` (uint8, the input's shape and affine), ``OUTDIR/<name>_qc.png``
(orthogonal slices through the largest lesion with the overlay, radiological convention), ``OUTDIR/report.json``
(modality, lesion volume in mL, lesion count, largest lesion, registration quality with warnings, timings, model)
and, with ``--save-mni``, ``<name>_mni.nii.gz`` and ``<name>_mni_seg.nii.gz`` (the registered image and its
segmentation on the model's MoME-space grid). MoME needs no modality label; ``--modality`` (default: guessed from a
``_t1``/``_flair``... file-name suffix) picks the registration template's contrast and is recorded in the report.

Output folder: checked before anything is read (an existing file, or a folder that cannot be written or created, is a
usage error). Results are staged beside it and moved in file by file. Its hidden ``.mome-manifest.json`` lists the
files MoME wrote and the input each came from: a re-run of an input overwrites its files and removes those it no
longer writes (``--save-mni`` dropped); other inputs' results (``report.json`` aside) and other files stay.

Exit codes: 0 ok, 1 internal error, 2 usage error (also an unusable ``-o``), 3 input rejected (reason printed; nothing
is written).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from operators import phi
from operators.limits import InputLimits, LimitExceeded, LimitSettingError, check_volume
from operators.output_folder import Staged, UnusableOutputFolder, check_output_folder, publish

__all__ = ["InputRejected", "build_parser", "guess_modality", "load_volume", "main", "run"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")
PROFILE_NAMES = ("fast", "parity", "accurate")  # scripts.profiles.PROFILES (a test keeps them in step)
PROFILE_HELP = (
    "inference profile: fast (default; bfloat16 on CPUs with native bf16), parity (the authors' tiling, float32 on "
    "CPU), accurate (parity + mirroring)"
)
MODE_HELP = (
    "auto (default): a study's T1/T1ce/T2/FLAIR series go to the bundle's MoME+ model together when it has one and "
    "the study has at least two of them; plus: always MoME+ for those series; single: one MoME run per series"
)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MODALITY_SUFFIX = re.compile(r"[_-](t1|t1ce|t2|flair|dwi)(?:_0000)?$", re.IGNORECASE)
logger = logging.getLogger("mome-seg")


class InputRejected(Exception):
    """The input cannot be segmented; the message names the file and the reason."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mome-seg", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="NIfTI volume (.nii/.nii.gz), DICOM folder or zip of DICOM files")
    parser.add_argument(
        "-o", "--out", type=Path, required=True, help="output folder (created; a re-run replaces only MoME's files)"
    )
    parser.add_argument("--modality", choices=MODALITIES, help="recorded in the report (MoME does not need it)")
    parser.add_argument("--model", type=Path, help="bundle folder (default: the installed bundle, $MOME_BUNDLE)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 passes; slower)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, help=PROFILE_HELP)
    parser.add_argument("--save-mni", action="store_true", help="also write the image and mask in MoME space")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="inference device (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    dicom = parser.add_argument_group("DICOM input")
    dicom.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES), help="only these")
    dicom.add_argument("--all-series", action="store_true", help="every qualifying series, not one per modality")
    dicom.add_argument("--rules", type=Path, help="modality router rules JSON (default: the shipped rules)")
    dicom.add_argument("--mode", choices=("auto", "single", "plus"), default="auto", help=MODE_HELP)
    return parser


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def guess_modality(path: Path) -> str | None:
    """Modality from a file-name suffix such as ``_flair`` or ``_t1ce_0000``, else ``None``."""
    match = MODALITY_SUFFIX.search(nifti_stem(path))
    return match.group(1).lower() if match else None


def _zero_based(array: np.ndarray) -> np.ndarray:
    """float32 copy with the minimum subtracted in float64 first, so large offsets (``scl_inter``, 32-bit data) keep
    their precision; a volume with NaN or infinite values is only cast (the segmenter rejects it, naming the count)."""
    if not np.isfinite(array).all():
        return array.astype(np.float32)
    return (array - array.min()).astype(np.float32)


def load_volume(path: Path, limits: InputLimits | None = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Reads a NIfTI volume as float32 (X, Y, Z) with its RAS affine; rejects what cannot be a 3-D MR volume.

    The declared shape is checked against ``limits`` (default :meth:`InputLimits.from_env`) before any data are
    read, so a small ``.nii.gz`` declaring a huge volume costs nothing.
    """
    if not path.is_file():
        raise InputRejected(f"{path}: file not found.")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputRejected(f"{path}: not a NIfTI file (.nii/.nii.gz); give DICOM as a folder or a zip.")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise InputRejected(f"{path}: cannot be read as NIfTI ({error}).") from error
    phi.register_nifti_header(image.header)  # its free text (descrip...) may hold a name: never echoed
    try:
        check_volume(image.shape, str(path), limits or InputLimits.from_env())
    except LimitExceeded as error:
        raise InputRejected(str(error)) from error
    try:
        array = _zero_based(np.asarray(image.dataobj, dtype=np.float64))
    except Exception as error:  # nibabel raises several types for corrupt files
        raise InputRejected(f"{path}: cannot be read as NIfTI ({error}).") from error
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputRejected(f"{path}: expected one 3-D volume, got shape {array.shape}.")
    return array, image.affine, image.header


def _say(quiet: bool):
    started = time.perf_counter()

    def say(message: str) -> None:
        if not quiet:
            print(phi.redact(f"[{time.perf_counter() - started:6.1f} s] {message}"), file=sys.stderr, flush=True)

    return say


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, like: nib.Nifti1Header | None = None) -> None:
    """Writes ``data`` with a new header holding the geometry only: ``affine`` as qform and sform (with ``like``'s
    codes) and ``like``'s units. No text field of the input header (``descrip``, ``aux_file``...) is copied."""
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(data.dtype)
    if like is not None:
        image.set_qform(affine, code=int(like["qform_code"]) or 1)
        image.set_sform(affine, code=int(like["sform_code"]) or 1)
        image.header.set_xyzt_units(*like.get_xyzt_units())
    nib.save(image, path)


def is_dicom_input(path: Path) -> bool:
    """A folder or a zip archive is DICOM input; a file is NIfTI."""
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def _segmenter(args: argparse.Namespace, say):
    """The bundle's MoME (``--model`` or the installed bundle) on ``--device``, with ``--tta``."""
    from app.bundle_path import default_bundle_dir
    from scripts.pipeline import MoMESegmenter

    bundle = (args.model or default_bundle_dir()).resolve()
    say(f"loading the model from {bundle}")
    return MoMESegmenter(bundle, device=args.device, tta=args.tta, profile=args.profile)


def _failure(error: Exception) -> int:
    """Prints why nothing was segmented; exit 2 for a missing file or model, 3 for a rejected input."""
    if isinstance(error, FileNotFoundError):
        print(phi.redact(f"mome-seg: {error}"), file=sys.stderr)
        return EXIT_USAGE
    print(phi.redact(f"mome-seg: input rejected: {error}"), file=sys.stderr)
    return EXIT_REJECTED


def run_dicom_input(args: argparse.Namespace) -> int:
    """DICOM folder/zip -> the Deploy application's graph (``app/app.py``); returns its exit code."""
    from app.app import AppOptions, run_app

    progress = None if args.quiet else _say(False)
    options = AppOptions(
        args.modalities,
        args.all_series,
        args.rules,
        args.device,
        args.tta,
        progress,
        profile=args.profile,
        mode=args.mode,
    )
    return run_app(args.input, args.out, args.model, options, prog="mome-seg")


def run(args: argparse.Namespace) -> int:
    """Segments ``args.input``; returns the exit code.

    Raises:
        UnusableOutputFolder: ``args.out`` cannot receive results (checked before the model or the input is read).
    """
    check_output_folder(args.out)
    if is_dicom_input(args.input):
        return run_dicom_input(args)
    from operators.qc_image import qc_caption, save_qc_png
    from operators.study_pipeline import staging_dir
    from scripts.metrics import lesion_summary
    from scripts.registration import VolumeRejected

    say = _say(args.quiet)
    total = time.perf_counter()
    try:
        array, affine, header = load_volume(args.input)
        segmenter = _segmenter(args, say)
        modality = args.modality or guess_modality(args.input)
        result = segmenter.segment(array, affine, name=str(args.input), modality=modality, progress=say)
    except (InputRejected, VolumeRejected, FileNotFoundError) as error:
        return _failure(error)

    stem = nifti_stem(args.input)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    registration = result.registration.to_dict()
    report = {
        "input": args.input.name,
        "modality": modality,
        "modality_source": "--modality" if args.modality else "file name" if modality else None,
        "shape": list(array.shape),
        "voxel_size_mm": np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist(),
        **lesion_summary(result.labels, voxel_ml),
        "registration": registration,
        "warnings": list(registration["warnings"]),
        "model": segmenter.describe(),
        "tta": bool(args.tta),
        "inference": result.inference,
        "outputs": {"segmentation": f"{stem}_seg.nii.gz", "qc_png": f"{stem}_qc.png"},
    }
    if args.save_mni:
        report["outputs"].update(mni_image=f"{stem}_mni.nii.gz", mni_segmentation=f"{stem}_mni_seg.nii.gz")
    for warning in report["warnings"]:
        say(f"WARNING: {warning}")
    staged = staging_dir(args.out)
    try:
        _save_nifti(result.labels, affine, staged / report["outputs"]["segmentation"], header)
        caption = qc_caption(report["modality"] or "MR", report, report["model"])
        save_qc_png(array, result.labels, affine, staged / report["outputs"]["qc_png"], caption)
        if args.save_mni:
            _save_nifti(
                result.mome_image.astype(np.float32), result.mome_affine, staged / report["outputs"]["mni_image"]
            )
            _save_nifti(result.mome_labels, result.mome_affine, staged / report["outputs"]["mni_segmentation"])
        report["seconds"] = {k: round(v, 2) for k, v in result.seconds.items()}
        report["seconds"]["total"] = round(time.perf_counter() - total, 2)
        (staged / "report.json").write_text(json.dumps(report, indent=2))
        publish([Staged(staged, args.out, args.input.name)])
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    say(
        f"done: {report['lesion_volume_ml']} mL in {report['lesion_count']} lesion(s) -> "
        f"{args.out / report['outputs']['segmentation']}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; usage errors (and ``--help``) return their exit code instead of raising SystemExit."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    from app.bundle_path import use_bundle_scripts

    phi.install()  # no patient name or ID in any log record or warning (operators/phi.py)
    try:
        use_bundle_scripts(args.model)
        return run(args)
    except (FileNotFoundError, UnusableOutputFolder, LimitSettingError) as error:
        print(phi.redact(f"mome-seg: {error}"), file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - the CLI's last line of defence: exit 1 with the traceback
        logger.exception("mome-seg: internal error")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
