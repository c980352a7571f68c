"""What a supervised run tells its supervisor so that a stop (SIGTERM, SIGINT) leaves nothing partial behind.

The console entry points run the work in a child process under :mod:`app.cli.supervisor`. On a stop the supervisor kills
the child at once (long ITK or PyTorch calls never return to Python in time, and Holoscan's own handler forces exit 1
after three seconds) and then removes what the child left: its private temporary folder (``TMPDIR``: extracted zips,
scratch files) and the paths recorded here (staging folders, an output folder the run created and left empty).

The one step that must not be cut in half is publishing the outputs: :func:`commit_guard` holds an exclusive lock on
the run's lock file while files move into the output folder, and the supervisor takes that lock before it kills the
child, so a stop either comes before the first file is published or after the last one.

Outside a supervised run (library use, tests) every function here does nothing.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CREATED", "RUN_DIR_ENV", "STAGING", "commit_guard", "lock_file", "record_path", "recorded_paths"]

RUN_DIR_ENV = "MOME_RUN_DIR"  # set by the supervisor for its child: the run's private folder
STAGING = "staging"  # a folder to remove on a stop
CREATED = "created"  # a folder the run created: removed on a stop when it is empty
_PATHS_FILE = "paths.tsv"
_LOCK_FILE = "commit.lock"


def _run_dir() -> Path | None:
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def lock_file(run_dir: Path) -> Path:
    """The lock that :func:`commit_guard` holds while outputs are published."""
    return run_dir / _LOCK_FILE


def record_path(kind: str, path: Path) -> None:
    """Tells the supervisor (if any) about a path to clean up on a stop; ``kind`` is ``STAGING`` or ``CREATED``."""
    run_dir = _run_dir()
    if run_dir is None:
        return
    if kind not in (STAGING, CREATED):
        raise ValueError(f"kind must be {STAGING!r} or {CREATED!r}, got {kind!r}.")
    with open(run_dir / _PATHS_FILE, "a", encoding="utf-8") as paths:
        paths.write(f"{kind}\t{Path(path).resolve()}\n")


def recorded_paths(run_dir: Path) -> list[tuple[str, Path]]:
    """The (kind, path) pairs a child recorded in ``run_dir``, in order."""
    try:
        lines = (run_dir / _PATHS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [(kind, Path(path)) for kind, _, path in (line.partition("\t") for line in lines) if path]


@contextmanager
def commit_guard() -> Iterator[None]:
    """Holds the run's commit lock (if supervised) while the block publishes outputs."""
    run_dir = _run_dir()
    if run_dir is None:
        yield
        return
    with open(lock_file(run_dir), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
