"""SIGTERM / SIGINT (an orchestrator stopping the job, Ctrl-C): exit 143 / 130 at once, nothing partial left.

0.9.1 ended with exit 1 after Holoscan's forced exit and left an empty output folder, the staging folder and the
extracted DICOM files (patient data) in the temporary folder. The console entry points now run the work in a
supervised child (``app.cli.supervisor``); these tests run the real commands as a user or an orchestrator would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STOP_WITHIN_SECONDS = 20.0  # generous for a loaded 2-core CI machine; the stop itself takes well under a second


def _environment(tmp_path: Path) -> dict[str, str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(scratch), "HOLOSCAN_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}


def _wait_for_line(process: subprocess.Popen, fragment: str, timeout: float = 300.0) -> list[str]:
    """Reads the child's stderr until a line holds ``fragment``; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"no line with {fragment!r} in: {''.join(lines)}")


def _zipped(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(folder))
    return archive


@pytest.mark.parametrize(
    ("command", "signum", "code"),
    [
        pytest.param("python -m app", signal.SIGTERM, 143, id="app-SIGTERM"),
        pytest.param("mome-seg", signal.SIGINT, 130, id="mome-seg-SIGINT"),
    ],
)
def test_a_stop_mid_study_exits_at_once_and_leaves_nothing(tmp_path, tiny_bundle, study, command, signum, code):
    folder, _, _ = study
    source = _zipped(folder, tmp_path / "study.zip")  # extracted into the temporary folder: must not stay there
    out = tmp_path / "results" / "out"
    if command == "mome-seg":
        mome_seg = str(Path(sys.executable).with_name("mome-seg"))
        argv = [mome_seg, str(source), "-o", str(out), "--model", str(tiny_bundle)]
    else:
        argv = [sys.executable, "-m", "app", "-i", str(source), "-o", str(out), "-m", str(tiny_bundle)]
    process = subprocess.Popen(
        argv, cwd=REPO, env=_environment(tmp_path), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        _wait_for_line(process, "registering")  # the child is inside the work, with the zip extracted
        extracted = list((tmp_path / "tmp").rglob("*.dcm"))
        assert extracted, "the zip should be extracted under the run's temporary folder while it runs"
        process.send_signal(signum)
        started = time.monotonic()
        returncode = process.wait(timeout=STOP_WITHIN_SECONDS)
        elapsed = time.monotonic() - started
    finally:
        process.kill()
    rest = process.stderr.read()
    assert returncode == code, rest
    assert elapsed < STOP_WITHIN_SECONDS and "stopped by " + signal.Signals(signum).name in rest
    assert not (tmp_path / "results").exists(), "the output folder (and its parent) were created by the run"
    assert list((tmp_path / "tmp").iterdir()) == [], "extracted files or scratch folders were left behind"


def test_a_stop_during_publishing_waits_for_the_last_file(tmp_path):
    """A child inside its commit (``commit_guard``) finishes it before it is killed: the output is complete."""
    out = tmp_path / "out"
    child = textwrap.dedent(
        f"""
        import pathlib, time
        from operators.clean_stop import commit_guard
        out = pathlib.Path({str(out)!r})
        out.mkdir()
        with commit_guard():
            (out / "first").write_text("1")
            time.sleep(2.0)
            (out / "second").write_text("2")
        time.sleep(60)
        """
    )
    supervisor = (
        "import sys; from app.cli.supervisor import supervise; "
        f"sys.exit(supervise([sys.executable, '-c', {child!r}], 'test'))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", supervisor], cwd=REPO, env=_environment(tmp_path), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "first").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=STOP_WITHIN_SECONDS)
    finally:
        process.kill()
    assert returncode == 143, process.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == ["first", "second"]


def test_without_a_stop_the_child_exit_code_passes_through(tmp_path):
    supervisor = (
        "import sys; from app.cli.supervisor import supervise; "
        "sys.exit(supervise([sys.executable, '-c', 'raise SystemExit(3)'], 't'))"
    )
    result = subprocess.run([sys.executable, "-c", supervisor], cwd=REPO, env=_environment(tmp_path))
    assert result.returncode == 3 and list((tmp_path / "tmp").iterdir()) == []
