"""Clean stop for the console entry points: SIGTERM / SIGINT end the run at once with nothing partial left behind.

``python -m app`` and ``mome-seg`` run their work in a child process (the same command with ``MOME_RUN_DIR`` set) and
stay in the parent as a small supervisor that imports neither PyTorch nor Holoscan. Why a child: the work spends
minutes inside ITK and PyTorch calls that do not return to Python, so an in-process handler could not stop it in
time, and Holoscan installs its own handler that forces exit 1 three seconds after an interrupt, leaving staging and
extracted files behind (found by the 0.9.1 robustness run).

On SIGTERM or SIGINT the supervisor
1. takes the run's commit lock (:func:`operators.clean_stop.commit_guard`): when the child is publishing outputs, it
   waits until the last file is in place (renames on one file system: milliseconds), so a result is either complete
   or absent;
2. kills the child's whole process group (SIGKILL);
3. removes the child's private temporary folder (its ``TMPDIR``: extracted zips and scratch files, which may hold
   patient data), every staging folder it recorded and an output folder it created and left empty;
4. exits with ``128 + signal``: 130 for SIGINT, 143 for SIGTERM (:data:`STOP_EXIT_CODES`).

The child runs in its own session, so a Ctrl-C at the terminal reaches only the supervisor, and it dies with the
supervisor (``PR_SET_PDEATHSIG``) should the supervisor itself be killed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from app.cli.exit_status import ExitCode
from operators.clean_stop import CREATED, RUN_DIR_ENV, STAGING, lock_file, recorded_paths

__all__ = ["STOP_EXIT_CODES", "STOP_SIGNALS", "die_with_parent", "is_supervised", "supervise"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_EXIT_CODES = {signal.SIGINT: ExitCode.SIGINT, signal.SIGTERM: ExitCode.SIGTERM}  # 128 + signal number
_PR_SET_PDEATHSIG = 1


def is_supervised() -> bool:
    """Whether this process is a supervised child (then it does the work itself)."""
    return bool(os.environ.get(RUN_DIR_ENV))


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """In a child between fork and exec: its own session, and SIGKILL when its parent dies (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def supervise(command: Sequence[str], prog: str) -> int:
    """Runs ``command`` (a Python entry point of this package) as a supervised child; returns its exit code, or 130 /
    143 after a stop."""
    run_dir = Path(tempfile.mkdtemp(prefix="mome-run-"))
    scratch = run_dir / "tmp"
    scratch.mkdir()
    lock_file(run_dir).touch()
    env = {**os.environ, RUN_DIR_ENV: str(run_dir), "TMPDIR": str(scratch)}
    previous = {signum: signal.signal(signum, _raise_stop) for signum in STOP_SIGNALS}
    child: subprocess.Popen | None = None
    try:
        child = subprocess.Popen(list(command), env=env, preexec_fn=die_with_parent)  # noqa: PLW1509
        return child.wait()
    except _Stop as stop:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        _stop_child(child, run_dir)
        name = signal.Signals(stop.signum).name
        print(f"{prog}: stopped by {name}; the run was abandoned and nothing partial was written.", file=sys.stderr)
        return STOP_EXIT_CODES[stop.signum]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _clean_up(run_dir)


def _stop_child(child: subprocess.Popen | None, run_dir: Path) -> None:
    """Waits for a commit in progress (the lock), then kills the child's process group."""
    if child is None:
        return
    import fcntl

    with open(lock_file(run_dir), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the child when its commit is done; kept until it is dead
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()


def _clean_up(run_dir: Path) -> None:
    """Removes the recorded staging folders, folders the run created and left without files, and the run folder."""
    for kind, path in recorded_paths(run_dir):
        if kind == STAGING:
            shutil.rmtree(path, ignore_errors=True)
        elif kind == CREATED and path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
