"""The MoME MONAI Deploy application: DICOM study in -> modality routing -> MoME -> DICOM-SEG, SR, QC image, report.

Graph (:meth:`MoMEApp.compose`)::

    StudyLoaderOperator --dicom_study_list--> ModalityRouterOperator --studies--> MoMEInferenceOperator
        --studies--> LesionSegWriterOperator --studies--> ReportWriterOperator

:func:`run_app` runs it on a folder or zip and returns the reports; ``python -m app`` (:mod:`app.cli.application`),
``mome-seg`` on DICOM input and :func:`app.api.segment_study` all come here. ``model`` is a MoME bundle folder, or a
folder holding exactly one (the MAP layout ``/opt/holoscan/models/<name>/``); without one the bundle installed with
the application is used. Paths left out fall back to the SDK's ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` /
``HOLOSCAN_MODEL_PATH``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application

from app.errors import UsageError
from operators import phi
from operators.bundle import choose_models, resolve_bundle
from operators.clean_stop import CREATED, record_path
from operators.limits import InputLimits
from operators.modality_router import MODALITIES
from operators.modality_router_operator import ModalityRouterOperator
from operators.mome_inference_operator import MoMEInferenceOperator
from operators.output_folder import (
    UnusableOutputFolder,
    check_output_folder,
    missing_folders,
    remove_empty,
    staging_dir,
)
from operators.report_writer_operator import ReportWriterOperator
from operators.seg_writer_operator import LesionSegWriterOperator
from operators.study import Mode, NothingToSegment, PlusSegmenter, Segmenter
from operators.study_loader_operator import StudyLoaderOperator

__all__ = ["AppOptions", "MoMEApp", "StudyResults", "run_app"]

logger = logging.getLogger(__name__)
Outcome = list[dict[str, Any]] | NothingToSegment | UnusableOutputFolder


@dataclass
class AppOptions:
    """What the SDK's command line does not cover: routing choices, how the model runs, progress, input limits."""

    modalities: Sequence[str] = MODALITIES
    all_series: bool = False
    rules_file: Path | None = None
    device: str | None = None  # None: cuda if available
    tta: bool = False
    progress: Callable[[str], None] | None = None
    segmenter: Segmenter | None = None  # instead of the bundle's MoME (embedding, tests)
    profile: str | None = None  # inference profile; None: the bundle's default
    mode: Mode = "auto"
    plus_segmenter: PlusSegmenter | None = None  # instead of the bundle's MoME+
    limits: InputLimits | None = None  # archive and series size limits; None: InputLimits.from_env() (MOME_MAX_*)


@dataclass(frozen=True)
class StudyResults:
    """What a run wrote: one report per study (as in ``OUT/<StudyInstanceUID>/report.json``)."""

    output: Path
    reports: list[dict[str, Any]] = field(default_factory=list)

    def study_folder(self, report: dict[str, Any]) -> Path:
        """The folder holding one study's SEG, SR, QC images and report."""
        return self.output / report["study_instance_uid"]


class MoMEApp(Application):
    """MoME brain-lesion segmentation of DICOM MR studies (MONAI Deploy application)."""

    name = "mome-brain-lesion-seg"
    description = "Brain lesion segmentation (MoME) of DICOM MR studies -> DICOM-SEG, QC image and report"

    def __init__(self, argv: Sequence[str] | None = None, options: AppOptions | None = None, **kwargs: Any) -> None:
        super().__init__(list(argv) if argv is not None else None, **kwargs)
        self.mome_options = options or AppOptions()  # ``options`` is taken by Holoscan
        self.staging: Path | None = None
        self.outcome: Outcome | None = None  # set by the report writer at the end of the graph

    def _finish(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        source, output = Path(context.input_path), Path(context.output_path)
        options = self.mome_options
        bundle = resolve_bundle(Path(context.model_path) if context.model_path else None)
        if options.segmenter is None and options.plus_segmenter is None:
            choose_models(bundle, options.mode)  # a mode the bundle has no model for fails here, before any work
        limits = options.limits or InputLimits.from_env()
        self.staging = staging_dir(output)
        loader = StudyLoaderOperator(
            self, CountCondition(self, 1), input_path=source, limits=limits, name="study_loader"
        )
        router = ModalityRouterOperator(
            self,
            rules_file=options.rules_file,
            modalities=options.modalities,
            all_series=options.all_series,
            name="modality_router",
        )
        inference = MoMEInferenceOperator(
            self,
            bundle_path=bundle,
            device=options.device,
            tta=options.tta,
            profile=options.profile,
            progress=options.progress,
            segmenter=options.segmenter,
            mode=options.mode,
            plus_segmenter=options.plus_segmenter,
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


def _sdk_argv(source: Path | None, out: Path | None, model: Path | None, sdk_args: Sequence[str]) -> list[str]:
    """The command line the SDK parses: its own flags (``-l WARN`` unless given) and the paths."""
    sdk_args = list(sdk_args)
    if not {"-l", "--log-level"} & set(sdk_args):
        sdk_args += ["-l", "WARN"]  # the SDK's INFO default logs every argument and highdicom step
    argv = [sys.executable, "mome-app", *sdk_args]  # Holoscan drops the interpreter, the SDK parser the program
    for flag, value in (("-i", source), ("-o", out), ("-m", model)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_app(
    source: Path | None,
    out: Path | None,
    model: Path | None = None,
    options: AppOptions | None = None,
    sdk_args: Sequence[str] = (),
) -> StudyResults:
    """Runs the graph on ``source`` (folder or zip) into ``out``; returns the reports of the studies written.

    ``out`` is checked before anything else and left untouched (not even created) unless something was segmented.
    ``sdk_args`` are further SDK flags (``-l``, ``-w``).

    Raises:
        UnusableOutputFolder: ``out`` cannot receive results.
        FileNotFoundError: ``model`` exists but is no bundle (a path that does not exist, as the SDK's default
            ``models``, means the installed bundle), or a bundle without the model ``options.mode`` needs.
        LimitSettingError: a ``MOME_MAX_*`` variable is not a positive number.
        UsageError: the SDK refused its command line (e.g. an unknown ``sdk_args`` flag, no input path).
        NothingToSegment: no series could be segmented (each reason in the message); nothing was written.
        RulesFileError: the rules file is missing or malformed (:mod:`operators.modality_router`).
        ArchiveRejected: an input that is neither folder nor a safe, readable zip.
        LimitExceeded: a zip or series over a limit.
        RuntimeError: the graph ended without a result (its error was logged).
    """
    phi.install()  # no patient name or ID in any log record or warning from here on (operators/phi.py)
    argv = _sdk_argv(source, out, model, sdk_args)
    out = check_output_folder(Path(out or os.environ.get("HOLOSCAN_OUTPUT_PATH") or "output"))
    created = missing_folders(out)
    if created:
        record_path(CREATED, created[-1])  # a stopped run's supervisor removes what the SDK's parser creates
    application = None
    try:
        application = MoMEApp(argv, options)
        application.run()
    except SystemExit as stop:  # the SDK's argument parser (unknown flag, missing input path)
        raise UsageError(f"the application's command line was refused (exit {stop.code}); see above.") from None
    finally:
        if application is not None and application.staging is not None:
            shutil.rmtree(application.staging, ignore_errors=True)
        remove_empty(created)  # the SDK's argument parser creates -o (and its parents) eagerly
    outcome = application.outcome
    if isinstance(outcome, Exception):
        raise outcome
    if outcome is None:
        raise RuntimeError("the graph ended without a result (see the log above).")
    return StudyResults(out, outcome)
