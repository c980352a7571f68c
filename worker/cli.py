"""``mome-worker``: the PACS worker service, and its status.

Usage::

    mome-worker --state-dir DIR [--model BUNDLE] [--config FILE] [--catch-up]   # the service
    mome-worker status --state-dir DIR                                         # queue, last success, failures (JSON)

Connection and behaviour come from the configuration file and the environment (:mod:`worker.settings`): the Orthanc
URL and credentials are never command-line arguments. Logs are JSON lines on stderr and in ``DIR/worker.log``: events
with study and Orthanc IDs, never a patient's name or ID. Exit codes: 0 stopped, 2 usage error (bad setting, no
bundle), 130 / 143 stopped by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from app.cli.exit_status import ExitCode
from operators import phi

__all__ = ["JsonLines", "main"]

STANDARD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, message and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            **{k: v for k, v in vars(record).items() if k not in STANDARD_FIELDS},
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return phi.redact(json.dumps(entry, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mome-worker",
        description="Segments every stable study of an Orthanc server and stores DICOM-SEG, SR and QC images back.",
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="journal, cursor, logs (created if missing)")
    parser.add_argument("--model", type=Path, help="MoME bundle folder (default: the installed bundle)")
    parser.add_argument("--config", type=Path, help="JSON settings (also $MOME_WORKER_CONFIG); see worker.settings")
    parser.add_argument(
        "--catch-up", action="store_true", help="on the first start, also segment the studies Orthanc already holds"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return _status(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    from worker.service import Worker
    from worker.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
        model = _checked_model(args.model)
    except (SettingsError, FileNotFoundError) as error:
        print(f"mome-worker: {error}", file=sys.stderr)
        return ExitCode.USAGE
    args.state_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(args.state_dir / "worker.log")
    worker = Worker(settings, args.state_dir, model, catch_up=args.catch_up)

    def stop(signum: int, frame: FrameType | None) -> None:
        worker.stop(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return worker.run()


def _checked_model(model: Path | None) -> Path | None:
    """The bundle folder, checked now rather than at each study (None: the installed bundle)."""
    from operators.bundle import resolve_bundle

    if model is not None and not model.exists():
        raise FileNotFoundError(f"--model {model}: no such folder.")
    bundle = resolve_bundle(model)  # raises FileNotFoundError when the folder holds no bundle
    if not (bundle / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{bundle}: no MoME bundle installed; pass --model BUNDLE.")
    return model


def _configure_logging(path: Path) -> None:
    phi.install()
    formatter = JsonLines()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr), logging.FileHandler(path)]
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mome-worker status", description="The worker's queue and outcomes (JSON).")
    parser.add_argument("--state-dir", type=Path, required=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    if not (args.state_dir / "journal.sqlite").is_file():
        print(f"mome-worker status: {args.state_dir}: no journal (the worker never ran there).", file=sys.stderr)
        return ExitCode.USAGE
    from worker.journal import Journal

    journal = Journal(args.state_dir)
    try:
        print(json.dumps(journal.status(), indent=2))
    finally:
        journal.close()
    return ExitCode.OK
