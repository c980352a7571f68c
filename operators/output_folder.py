"""Output folder rules shared by every entry point: fail fast on an unusable ``-o``; re-runs replace only our files.

An output folder is checked before any model is loaded or any input is read (:func:`check_output_folder`). Results
are staged beside it and published file by file with ``os.replace`` (:func:`publish`): each published folder holds a
hidden manifest (:data:`MANIFEST`) that maps every file MoME wrote there to its source (the input file name, or the
StudyInstanceUID). A re-run overwrites the files it writes again, removes the files of the same source that it no
longer writes, and never touches any other file or folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from operators.clean_stop import CREATED, STAGING, commit_guard, record_path

__all__ = [
    "MANIFEST",
    "Staged",
    "UnusableOutputFolder",
    "check_output_folder",
    "missing_folders",
    "publish",
    "read_manifest",
    "remove_empty",
    "staging_dir",
]

MANIFEST = ".mome-manifest.json"
WRITER = "MoME"


class UnusableOutputFolder(Exception):
    """The output folder cannot receive results; the message names the path and the reason (exit code 2)."""


def check_output_folder(out: Path) -> Path:
    """The absolute output folder, once it is known to be usable; creates nothing.

    ``out`` must be a writable folder or not exist yet; its parent (where the staging folder goes) or, when missing,
    the parent's nearest existing ancestor must be a writable folder.

    Raises:
        UnusableOutputFolder: ``out`` is an existing non-folder or read-only, or its parent cannot be created/written.
    """
    out = Path(out).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise UnusableOutputFolder(f"{out}: exists and is not a folder.")
        _require_writable(out, f"{out}: the output folder is not writable.")
    ancestor = _nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise UnusableOutputFolder(f"{out}: cannot be created, {ancestor} is not a folder.")
    _require_writable(ancestor, f"{out}: {ancestor} is not writable (the output folder's staging goes there).")
    return out


def _require_writable(folder: Path, message: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnusableOutputFolder(message)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def missing_folders(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, deepest first (see :func:`remove_empty`)."""
    out = Path(out).absolute()
    return [folder for folder in (out, *out.parents) if not folder.exists()]


def remove_empty(folders: Iterable[Path]) -> None:
    """Removes the given folders, deepest first, while they are empty (what a run created but did not fill)."""
    for folder in folders:
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()


@dataclass(frozen=True)
class Staged:
    """Files staged in ``folder`` for ``target``, made from ``source`` (an input file name, a StudyInstanceUID)."""

    folder: Path
    target: Path
    source: str


def publish(staged: Sequence[Staged]) -> None:
    """Moves each staged folder's files into its target folder, replacing or removing only MoME's files.

    Every target is checked before anything moves. Per target: the manifest first lists the previous and the new
    files (so an interrupted publish leaves no unlisted MoME file); each file is moved with ``os.replace``; the files
    that the manifest attributes to the same source and that this run did not write again are removed; the manifest
    then maps each MoME file still there to its source. Staged folders hold files only; they are left empty.

    Raises:
        UnusableOutputFolder: a target is not a folder or not writable, or holds a folder where a file goes.
    """
    for item in staged:
        _check_target(item)
    with commit_guard():  # a supervised run is not killed halfway through (operators/clean_stop.py)
        for item in staged:
            _publish_folder(item)


def _staged_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.is_file() and path.name != MANIFEST)


def _check_target(item: Staged) -> None:
    if not item.target.exists():
        return
    if not item.target.is_dir():
        raise UnusableOutputFolder(f"{item.target}: exists and is not a folder.")
    _require_writable(item.target, f"{item.target}: the output folder is not writable.")
    for name in [*_staged_files(item.folder), MANIFEST]:
        path = item.target / name
        if path.is_dir() and not path.is_symlink():
            raise UnusableOutputFolder(f"{path}: a folder where MoME writes a file.")


def _publish_folder(item: Staged) -> None:
    new = dict.fromkeys(_staged_files(item.folder), item.source)
    previous = read_manifest(item.target)
    item.target.mkdir(parents=True, exist_ok=True)
    _write_manifest(item, {**previous, **new})
    for name in new:
        _move(item.folder / name, item.target / name)
    _write_manifest(item, {**_remove_stale(item, previous, new), **new})


def _remove_stale(item: Staged, previous: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """Removes the earlier files of ``item.source`` not written again; returns the other sources' files still there."""
    others = {}
    for name, source in previous.items():
        path = item.target / name
        if name in new or not (path.is_file() or path.is_symlink()):
            continue
        if source == item.source:
            path.unlink()
        else:
            others[name] = source
    return others


def read_manifest(folder: Path) -> dict[str, str]:
    """File name -> source, as MoME's manifest in ``folder`` lists them; empty without a readable manifest.

    Only plain names of files inside ``folder`` count: a path, ``..`` or the manifest itself is ignored.
    """
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {name: source for name, source in files.items() if _is_plain_name(name) and isinstance(source, str)}


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MANIFEST) and Path(name).name == name


def _write_manifest(item: Staged, files: Mapping[str, str]) -> None:
    manifest = {"written_by": WRITER, "files": dict(sorted(files.items()))}
    (item.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _move(item.folder / MANIFEST, item.target / MANIFEST)


def _move(source: Path, target: Path) -> None:
    """``os.replace``; across file systems (an output folder that is a mount point) a copy beside ``target`` first."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.mome-partial")
        try:
            shutil.copy2(source, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        source.unlink()


def staging_dir(out: Path) -> Path:
    """A hidden, empty folder beside ``out`` (same file system, so :func:`publish` moves are atomic renames)."""
    out = out.resolve()
    missing = missing_folders(out.parent)
    if missing:
        record_path(CREATED, missing[-1])  # the outermost: a stopped run's supervisor removes it
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.mome-", dir=out.parent))
    record_path(STAGING, staging)
    return staging
