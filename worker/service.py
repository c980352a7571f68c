"""The worker: Orthanc's change feed -> journal -> the application on each stable study -> results back to Orthanc.

One loop looks at the feed (every ``poll_seconds``), records a job per new study version (:mod:`worker.journal`) and
starts due jobs, up to ``jobs`` at a time, each in a thread. A job:

1. deletes what an interrupted earlier attempt of it stored (the journal lists it);
2. downloads the study's source series (not MoME's own results) as a ZIP;
3. runs ``python -m app`` on it in a child process (the same code path as a run by hand; its log is kept in
   ``STATE/logs/job-<id>.log``); the child dies with the worker;
4. exit 3 (input rejected): the study is marked ``mome-rejected`` with the application's reason, nothing stored;
5. success: records the SOPInstanceUIDs it will store, stores the SEGs, SRs and QC captures, forwards them (when
   ``forward_to`` is set), removes the study's earlier results (``previous_results = replace``) and marks the study
   ``mome-done``;
6. any other failure: retried after ``retry_seconds`` (doubling), then marked ``mome-failed`` with the reason.

Orthanc out of reach never costs a study an attempt: the loop waits (doubling up to a minute) and goes on from the
persisted cursor. SIGTERM / SIGINT: the running applications are stopped (they leave nothing partial), their jobs go
back to the queue uncounted, and the worker exits 143 / 130.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from app.cli.exit_status import ExitCode
from app.cli.supervisor import die_with_parent
from operators import phi
from worker.journal import Job, Journal
from worker.orthanc import Orthanc, OrthancError, OrthancUnavailable, SeriesInfo
from worker.results import collect
from worker.settings import WorkerSettings

__all__ = ["Worker", "fingerprint"]

logger = logging.getLogger("mome.worker")
STACK_BYTES = 32 * 1024 * 1024  # Holoscan's stack
MAX_WAIT_S = 60.0
REJECTED_MARK = "input rejected: "
REASON_CHARS = 1000


def fingerprint(series: Sequence[SeriesInfo]) -> str:
    """The version of a study: its source series with their instance counts (MoME's own series left out)."""
    lines = sorted(f"{s.series_uid}:{s.instances}" for s in series if not s.written_by_mome)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


class Worker:
    """Follows one Orthanc server (module docstring).

    Args:
        settings: connection and behaviour (:mod:`worker.settings`).
        state_dir: journal, logs and scratch space.
        model: the bundle (``python -m app -m``); None: the installed one.
        catch_up: on the very first start, also segment the studies the feed already holds (default: new ones only).
    """

    def __init__(self, settings: WorkerSettings, state_dir: Path, model: Path | None, catch_up: bool = False) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.model = model
        self.catch_up = catch_up
        self.journal = Journal(state_dir)
        self.orthanc = Orthanc(settings)
        self.stopping = threading.Event()
        self.stop_signal: int | None = None
        self._children: dict[int, subprocess.Popen] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.RLock()  # also taken by stop(), from a signal handler on the main thread
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)

    # -- the loop ----------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Runs until SIGTERM / SIGINT (or :meth:`stop`); returns the exit code (0, 130 or 143)."""
        for job_id in self.journal.recover():
            logger.info("job redone after an interruption", extra={"event": "job.recovered", "job": job_id})
        logger.info("worker started", extra={"event": "worker.started", "orthanc": self.orthanc.url})
        wait = self.settings.poll_seconds
        while not self.stopping.is_set():
            try:
                self.poll()
                wait = self.settings.poll_seconds
            except OrthancUnavailable as error:
                logger.warning("Orthanc unavailable", extra={"event": "orthanc.unavailable", "error": str(error)})
                wait = min(MAX_WAIT_S, wait * 2)
            except Exception:  # an unexpected answer: logged, and the feed is read again later (the cursor stays)
                logger.exception("change feed not read", extra={"event": "feed.error"})
                wait = min(MAX_WAIT_S, wait * 2)
            started = self.dispatch()
            self.stopping.wait(0 if started else wait)
        self._shut_down()
        return 0 if self.stop_signal is None else 128 + self.stop_signal

    def stop(self, signum: int | None = None) -> None:
        """Asks the loop to end; running applications are stopped and their jobs go back to the queue."""
        self.stop_signal = signum
        self.stopping.set()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def poll(self) -> int:
        """Reads the change feed from the cursor; records a job per new stable study version. Returns the jobs."""
        since = self.journal.cursor()
        if since is None:
            since = 0 if self.catch_up else self.orthanc.last_change()
            self.journal.advance(since)
        created = 0
        while True:
            changes, last, done = self.orthanc.changes(since)
            found = []
            for change in changes:
                if change.change_type == "StableStudy" and change.resource_type == "Study":
                    version = self._version(change.resource_id, change.seq)
                    if version is not None:
                        found.append(version)
            for job_id in self.journal.advance(last, found):
                created += 1
                logger.info("study queued", extra={"event": "job.queued", **self._job_fields(self.journal.job(job_id))})
            since = last
            if done or not changes:
                return created

    def _version(self, study: str, seq: int) -> tuple[str, str, str, int] | None:
        """``(study, study_uid, fingerprint, seq)`` of a stable study; None when it holds only MoME's results or is
        gone (deleted since)."""
        try:
            series = self.orthanc.series(study)
            if all(s.written_by_mome for s in series):
                return None
            return study, self.orthanc.study_uid(study), fingerprint(series), seq
        except OrthancError:
            logger.info("stable study gone", extra={"event": "feed.study_gone", "orthanc_study": study})
            return None

    def dispatch(self) -> int:
        """Starts due jobs while fewer than ``jobs`` run; returns how many it started."""
        started = 0
        while not self.stopping.is_set():
            with self._lock:
                self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
                if len(self._threads) >= self.settings.jobs:
                    return started
                job = self.journal.claim()
                if job is None:
                    return started
                thread = threading.Thread(target=self.process, args=(job,), name=f"job-{job.id}", daemon=True)
                self._threads[job.id] = thread
            thread.start()
            started += 1
        return started

    def _shut_down(self) -> None:
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join()
        self.journal.close()
        logger.info("worker stopped", extra={"event": "worker.stopped", "signal": self.stop_signal})

    # -- one job -----------------------------------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        """Segments one study version and stores the results (module docstring); never raises."""
        fields = self._job_fields(job)
        logger.info("study started", extra={"event": "job.started", **fields, "attempt": job.attempts})
        workdir = self.state_dir / "work" / f"job-{job.id}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        started = time.monotonic()
        try:
            self._segment(job, workdir)
        except OrthancUnavailable as error:
            self.journal.retry_later(job.id, self.settings.retry_seconds, str(error), count_attempt=False)
            logger.warning("study deferred", extra={"event": "job.deferred", **fields, "error": str(error)})
        except Exception as error:  # one study never stops the worker
            self._failed(job, phi.redact(f"{type(error).__name__}: {error}"))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            seconds = round(time.monotonic() - started, 1)
            logger.info("study ended", extra={"event": "job.ended", **fields, "seconds": seconds})

    def _segment(self, job: Job, workdir: Path) -> None:
        self._remove_outputs(job)
        series = self.orthanc.series(job.study)
        if fingerprint(series) != job.fingerprint:
            self.journal.finish(job.id, "superseded", "the study changed before it ran; its new version is queued")
            return
        archive = workdir / "study.zip"
        self.orthanc.download_archive([s.orthanc_id for s in series if not s.written_by_mome], archive)
        code, log = self._run_app(job, archive, workdir / "out")
        if self.stopping.is_set() and code in (ExitCode.SIGTERM, ExitCode.SIGINT):
            self.journal.retry_later(job.id, 0, "the worker stopped during the study", count_attempt=False)
            logger.info("study abandoned", extra={"event": "job.abandoned", **self._job_fields(job)})
            return
        if code == ExitCode.REJECTED:
            reason = _rejection_reason(log, archive)
            self.orthanc.set_status(job.study, "mome-rejected", reason)
            self.journal.finish(job.id, "rejected", reason)
            logger.info("study rejected", extra={"event": "job.rejected", **self._job_fields(job), "reason": reason})
            return
        if code != ExitCode.OK:
            raise RuntimeError(f"the application exited with {code} ({_last_line(log)})")
        self._store(job, workdir / "out")

    def _store(self, job: Job, output: Path) -> None:
        results = collect(output)
        self.journal.record_outputs(job.id, results.sop_instance_uids)  # before storing: a redo deletes them
        stored = [self.orthanc.store(path) for path in results.files]
        if self.settings.forward_to:
            self.orthanc.send_to_modality(self.settings.forward_to, stored)
        if self.settings.previous_results == "replace":
            for earlier in self.journal.jobs(job.study):
                if earlier.id != job.id and earlier.outputs:
                    self.orthanc.delete_instances(earlier.outputs)
                    self.journal.forget_outputs(earlier.id, earlier.outputs)
        self.orthanc.set_status(job.study, "mome-done")
        summary = results.summary()
        self.journal.finish(job.id, "done", summary=summary)
        logger.info("study done", extra={"event": "job.done", **self._job_fields(job), **summary})

    def _remove_outputs(self, job: Job) -> None:
        """Deletes what an interrupted attempt of this job stored (recorded before it stored it)."""
        if job.outputs:
            deleted = self.orthanc.delete_instances(job.outputs)
            self.journal.forget_outputs(job.id, job.outputs)
            logger.info("earlier attempt removed", extra={"event": "job.cleaned", "job": job.id, "deleted": deleted})

    def _run_app(self, job: Job, archive: Path, output: Path) -> tuple[int, Path]:
        """``python -m app`` on the archive; returns its exit code and log file."""
        command = [sys.executable, "-m", "app", "-i", str(archive), "-o", str(output), "--quiet"]
        if self.model is not None:
            command += ["-m", str(self.model)]
        command += list(self.settings.app_args)
        log = self.state_dir / "logs" / f"job-{job.id}.log"
        env = {**os.environ, "HOLOSCAN_LOG_LEVEL": os.environ.get("HOLOSCAN_LOG_LEVEL", "ERROR")}
        with log.open("a") as sink:
            child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_setup)  # noqa: PLW1509
            with self._lock:
                self._children[job.id] = child
            if self.stopping.is_set():  # a stop that came before the child existed
                child.send_signal(signal.SIGTERM)
            try:
                code = child.wait()
            finally:
                with self._lock:
                    self._children.pop(job.id, None)
        return code, log

    def _failed(self, job: Job, reason: str) -> None:
        """A failed attempt: retried with backoff, or, after ``max_attempts``, the study is marked failed."""
        fields = self._job_fields(job)
        if job.attempts < self.settings.max_attempts:
            delay = self.settings.retry_seconds * 2 ** (job.attempts - 1)
            self.journal.retry_later(job.id, delay, reason)
            logger.warning(
                "study will be retried", extra={"event": "job.retry", **fields, "reason": reason, "in_s": delay}
            )
            return
        try:
            self.orthanc.set_status(job.study, "mome-failed", reason)
        except OrthancUnavailable:
            pass  # the journal keeps the reason; mome-worker status shows it
        self.journal.finish(job.id, "failed", reason)
        logger.error("study failed", extra={"event": "job.failed", **fields, "reason": reason})

    @staticmethod
    def _job_fields(job: Job) -> dict[str, object]:
        return {"job": job.id, "study_uid": job.study_uid, "orthanc_study": job.study}


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The application's child: Holoscan's stack size, and death with the worker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    die_with_parent()


def _rejection_reason(log: Path, archive: Path) -> str:
    """The application's reason for rejecting the input (after ``input rejected:``, the worker's scratch path left
    out), else its last line."""
    text = log.read_text(errors="replace")
    at = text.rfind(REJECTED_MARK)
    reason = text[at + len(REJECTED_MARK) :] if at >= 0 else _last_line(log)
    reason = reason.replace(f"{archive}: ", "").replace(str(archive), "the study")
    return " ".join(reason.split())[:REASON_CHARS]


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:REASON_CHARS] if lines else "no output"
