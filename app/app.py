"""The MoME MONAI Deploy application: DICOM study in -> modality routing -> MoME -> DICOM-SEG, QC image, report.

Graph (``compose``)::

    StudyLoaderOperator --dicom_study_list--> ModalityRouterOperator --studies--> MoMEInferenceOperator
        --studies--> LesionSegWriterOperator --studies--> ReportWriterOperator

Run it as ``python -m app -i IN -o OUT [-m MODEL]`` (SDK flags; or ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH``
/ ``HOLOSCAN_MODEL_PATH``) or ``mome-seg DICOM_DIR_OR_ZIP -o OUT``; both run this graph. ``MODEL`` is a MoME bundle
folder, or a folder holding exactly one (the MAP layout ``/opt/holoscan/models/<name>/``); without one the bundle
installed with the application is used.

Exit codes (:func:`run_app`): 0 ok, 1 internal error, 2 usage error (bad model path or rules file, unusable output
folder, a ``MOME_MAX_*`` limit that is not a positive number), 3 input rejected (nothing to segment, or an input over
one of the limits of ``operators.limits``; the reason is printed and nothing is written).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application

from app.bundle_path import default_bundle_dir, installed_models
from app.cli_seg import MODE_HELP, PROFILE_HELP, PROFILE_NAMES
from operators import phi
from operators.clean_stop import CREATED, record_path
from operators.limits import InputLimits, LimitSettingError
from operators.modality_router import MODALITIES
from operators.modality_router_operator import ModalityRouterOperator
from operators.mome_inference_operator import MoMEInferenceOperator
from operators.output_folder import UnusableOutputFolder, check_output_folder, missing_folders, remove_empty
from operators.report_writer_operator import ReportWriterOperator
from operators.seg_writer_operator import LesionSegWriterOperator
from operators.study_loader_operator import StudyLoaderOperator
from operators.study_pipeline import MODES, NothingToSegment, staging_dir

__all__ = ["AppOptions", "MoMEApp", "resolve_bundle", "run_app"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
logger = logging.getLogger("mome.app")


@dataclass
class AppOptions:
    """What the SDK's command line does not cover: routing choices, device, mirroring and progress output."""

    modalities: Sequence[str] = MODALITIES
    all_series: bool = False
    rules_file: Path | None = None
    device: str | None = None
    tta: bool = False
    progress: Callable[[str], None] | None = None
    segmenter: Any = None  # an object with segment()/describe() instead of the bundle's model (tests, embedding)
    profile: str | None = None  # inference profile; None: the bundle's default
    mode: str = "auto"  # auto | single | plus: feed T1/T1ce/T2/FLAIR to the bundle's MoME+ model together
    plus_segmenter: Any = None  # an object with segment_channels()/describe() instead of the bundle's MoME+ model
    limits: InputLimits | None = None  # archive and series size limits; None: InputLimits.from_env() (MOME_MAX_*)
    outcome: list[dict[str, Any]] | NothingToSegment | UnusableOutputFolder | None = field(default=None, repr=False)


def resolve_bundle(model_path: Path | None) -> Path:
    """The MoME bundle folder for ``-m`` / ``HOLOSCAN_MODEL_PATH``.

    A bundle folder itself, a folder holding exactly one bundle (the MAP's ``models/<name>/``), or, when the path does
    not exist (the SDK's default ``models``), the bundle installed with the application.

    Raises:
        FileNotFoundError: the path exists but holds no (or more than one) MoME bundle.
    """
    if model_path is None or not Path(model_path).exists():
        return default_bundle_dir().resolve()
    path = Path(model_path).resolve()
    if (path / "configs" / "inference.json").is_file():
        return path
    children = sorted(path.iterdir()) if path.is_dir() else []
    candidates = [child for child in children if (child / "configs" / "inference.json").is_file()]
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{path}: not a MoME bundle folder (configs/inference.json) nor a folder holding exactly one "
            f"({len(candidates)} found)."
        )
    return candidates[0]


class MoMEApp(Application):
    """MoME brain-lesion segmentation of DICOM MR studies (MONAI Deploy application)."""

    name = "mome-brain-lesion-seg"
    description = "Brain lesion segmentation (MoME) of DICOM MR studies -> DICOM-SEG, QC image and report"

    def __init__(self, argv: Sequence[str] | None = None, options: AppOptions | None = None, **kwargs: Any) -> None:
        super().__init__(list(argv) if argv is not None else None, **kwargs)
        self.mome_options = options or AppOptions()  # ``options`` is taken by Holoscan
        self.staging: Path | None = None

    def _finish(self, outcome: list[dict[str, Any]] | NothingToSegment | UnusableOutputFolder) -> None:
        self.mome_options.outcome = outcome

    def _check_mode(self, bundle: Path) -> None:
        """``--mode plus`` needs a MoME+ model, ``--mode single`` a single-modality one (FileNotFoundError: exit 2)."""
        options = self.mome_options
        if options.segmenter is not None or options.plus_segmenter is not None:
            return
        models = installed_models(bundle)
        if options.mode == "plus" and not models["plus"]:
            raise FileNotFoundError(
                f"{bundle}: --mode plus needs a MoME+ model (models/model_plus.pt); none installed."
            )
        if options.mode == "single" and not models["single"]:
            raise FileNotFoundError(f"{bundle}: --mode single needs a MoME model (models/model.pt); none installed.")
        if not any(models.values()):
            raise FileNotFoundError(f"{bundle}: the bundle has no weights (models/model.pt or models/model_plus.pt).")

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        source, output = Path(context.input_path), Path(context.output_path)
        bundle = resolve_bundle(Path(context.model_path) if context.model_path else None)
        self._check_mode(bundle)
        limits = self.mome_options.limits or InputLimits.from_env()
        self.staging = staging_dir(output)
        loader = StudyLoaderOperator(
            self, CountCondition(self, 1), input_path=source, limits=limits, name="study_loader"
        )
        router = ModalityRouterOperator(
            self,
            rules_file=self.mome_options.rules_file,
            modalities=self.mome_options.modalities,
            all_series=self.mome_options.all_series,
            name="modality_router",
        )
        inference = MoMEInferenceOperator(
            self,
            bundle_path=bundle,
            device=self.mome_options.device,
            tta=self.mome_options.tta,
            profile=self.mome_options.profile,
            progress=self.mome_options.progress,
            segmenter=self.mome_options.segmenter,
            mode=self.mome_options.mode,
            plus_segmenter=self.mome_options.plus_segmenter,
            limits=limits,
            name="mome_inference",
        )
        seg_writer = LesionSegWriterOperator(self, staging=self.staging, name="dicom_seg_writer")
        reporter = ReportWriterOperator(
            self, staging=self.staging, output_folder=output, on_done=self._finish, source=str(source), name="report"
        )
        self.add_flow(loader, router, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(router, inference, {("studies", "studies")})
        self.add_flow(inference, seg_writer, {("studies", "studies")})
        self.add_flow(seg_writer, reporter, {("studies", "studies")})


def _say(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    started = time.perf_counter()

    def say(message: str) -> None:
        print(phi.redact(f"[{time.perf_counter() - started:6.1f} s] {message}"), file=sys.stderr, flush=True)

    return say


def run_app(
    source: Path | None,
    out: Path | None,
    model: Path | None = None,
    options: AppOptions | None = None,
    prog: str = "mome-app",
    sdk_args: Sequence[str] = (),
) -> int:
    """Runs the graph on ``source`` (folder or zip) into ``out``; returns the exit code (0, 1, 2 or 3).

    ``None`` paths fall back to the SDK's ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` / ``HOLOSCAN_MODEL_PATH``;
    ``sdk_args`` are further SDK flags (``-l``, ``-w``). Prints the reason for exits 2 and 3. ``out`` is checked before
    anything else (exit 2 if unusable) and left untouched (not even created) unless something was segmented.
    """
    phi.install()  # no patient name or ID in any log record or warning from here on (operators/phi.py)
    options = options or AppOptions()
    sdk_args = list(sdk_args)
    if not {"-l", "--log-level"} & set(sdk_args):
        sdk_args += ["-l", "WARN"]  # the SDK's INFO default logs every argument and highdicom step
    argv = [sys.executable, prog, *sdk_args]  # Holoscan drops the interpreter, the SDK parser the program
    for flag, value in (("-i", source), ("-o", out), ("-m", model)):
        if value is not None:
            argv += [flag, str(value)]
    out = Path(out or os.environ.get("HOLOSCAN_OUTPUT_PATH") or "output")
    try:
        check_output_folder(out)
    except UnusableOutputFolder as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_USAGE
    created = missing_folders(out)
    if created:
        record_path(CREATED, created[-1])  # a stopped run's supervisor removes what the SDK's parser creates
    application = None
    try:
        application = MoMEApp(argv, options)
        application.run()
    except SystemExit as stop:  # the SDK's argument parser (unknown flag, missing input path)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    except (FileNotFoundError, LimitSettingError) as error:  # bad model path or rules file, bad MOME_MAX_* value
        print(phi.redact(f"{prog}: {error}"), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as error:  # a malformed rules file, an input that is neither folder nor zip or over a limit
        print(phi.redact(f"{prog}: input rejected: {error}"), file=sys.stderr)
        return EXIT_REJECTED
    finally:
        if application is not None and application.staging is not None:
            shutil.rmtree(application.staging, ignore_errors=True)
        remove_empty(created)  # the SDK's argument parser creates -o (and its parents) eagerly
    return _outcome_code(options.outcome, prog)


def _outcome_code(outcome: list[dict[str, Any]] | NothingToSegment | UnusableOutputFolder | None, prog: str) -> int:
    """The exit code for what the graph handed back; prints the reason for exits 1, 2 and 3."""
    if isinstance(outcome, UnusableOutputFolder):
        print(phi.redact(f"{prog}: {outcome}"), file=sys.stderr)
        return EXIT_USAGE
    if isinstance(outcome, NothingToSegment):
        print(phi.redact(f"{prog}: input rejected: {outcome}"), file=sys.stderr)
        return EXIT_REJECTED
    if outcome is None:
        print(f"{prog}: the graph ended without a result (see the log above).", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """MoME's options; the SDK's own flags (``-l``, ``-w``, ``-t``) pass through untouched."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", type=Path, help="DICOM folder or zip (default: $HOLOSCAN_INPUT_PATH, input)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: $HOLOSCAN_OUTPUT_PATH, output)")
    parser.add_argument("-m", "--model", type=Path, help="MoME bundle folder (default: $HOLOSCAN_MODEL_PATH, bundled)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES), help="only these")
    parser.add_argument("--all-series", action="store_true", help="every qualifying series, not one per modality")
    parser.add_argument("--rules", type=Path, help="modality router rules JSON (default: the shipped rules)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="inference device (default: cuda if available)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 passes; slower)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, help=PROFILE_HELP)
    parser.add_argument("--mode", choices=MODES, default="auto", help=MODE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app``: parse MoME's options, hand the rest to the SDK, run the graph; returns the exit code."""
    try:
        args, sdk_args = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    options = AppOptions(
        args.modalities,
        args.all_series,
        args.rules,
        args.device,
        args.tta,
        _say(args.quiet),
        profile=args.profile,
        mode=args.mode,
    )
    try:
        return run_app(args.input, args.output, args.model, options, "python -m app", sdk_args)
    except Exception:  # noqa: BLE001 - last line of defence: exit 1 with the traceback
        logger.exception("internal error")
        return EXIT_INTERNAL
