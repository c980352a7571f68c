"""The worker's journal (SQLite in the state folder): the change-feed cursor and one job per study version.

A job is a study (Orthanc ID) with a *fingerprint* of its source series (each SeriesInstanceUID with its instance
count, MoME's own results left out). The cursor moves in the same transaction that records the jobs its changes
produced, so a change is never lost and never counted twice, across crashes. ``(study, fingerprint)`` is unique: a
study is processed once per version; a series added later makes a new version, hence a new job.

States: ``pending`` (waiting, possibly until ``not_before``) -> ``running`` -> ``done`` / ``rejected`` / ``failed``;
``superseded`` when a newer version of the study arrived before it ran. A job found ``running`` when the worker
starts was interrupted (killed): it goes back to ``pending`` and is redone. Before a job uploads anything it records
the SOPInstanceUIDs it will store (``outputs``), so a redo first deletes what an interrupted attempt left in Orthanc:
one result per study, whatever the moment of the kill.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FINAL_STATES", "Job", "Journal"]

FINAL_STATES = ("done", "rejected", "failed", "superseded")
SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id = 1), last_change INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    change_seq INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    summary TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    UNIQUE (study, fingerprint)
);
"""


@dataclass(frozen=True)
class Job:
    """One row of the journal."""

    id: int
    study: str
    study_uid: str
    fingerprint: str
    state: str
    attempts: int
    outputs: tuple[str, ...]
    reason: str
    summary: dict[str, Any]


class Journal:
    """The journal in ``state_dir/journal.sqlite`` (created on first use; safe for the worker's threads)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "journal.sqlite"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- the change feed ---------------------------------------------------------------------------------------------

    def cursor(self) -> int | None:
        """The last change handled; None before the first look at the feed."""
        with self._lock:
            row = self._db.execute("SELECT last_change FROM cursor WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def advance(self, last_change: int, jobs: Sequence[tuple[str, str, str, int]] = ()) -> list[int]:
        """Records the jobs ``(study, study_uid, fingerprint, change_seq)`` found up to ``last_change`` and moves the
        cursor there, in one transaction. Returns the ids of the new jobs (a known study version is not new)."""
        created = []
        with self._transaction() as db:
            for study, study_uid, fingerprint, seq in jobs:
                known = db.execute("SELECT id FROM jobs WHERE study = ? AND fingerprint = ?", (study, fingerprint))
                if known.fetchone() is not None:
                    continue
                db.execute(
                    "UPDATE jobs SET state = 'superseded', finished = ? WHERE study = ? AND state = 'pending'",
                    (time.time(), study),
                )
                cursor = db.execute(
                    "INSERT INTO jobs (study, study_uid, fingerprint, change_seq, created) VALUES (?, ?, ?, ?, ?)",
                    (study, study_uid, fingerprint, seq, time.time()),
                )
                created.append(int(cursor.lastrowid))
            db.execute("INSERT OR REPLACE INTO cursor (id, last_change) VALUES (1, ?)", (last_change,))
        return created

    # -- jobs --------------------------------------------------------------------------------------------------------

    def recover(self) -> list[int]:
        """Jobs left ``running`` by a worker that was killed go back to ``pending``; returns their ids."""
        with self._transaction() as db:
            ids = [int(r[0]) for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            db.execute("UPDATE jobs SET state = 'pending', not_before = 0 WHERE state = 'running'")
        return ids

    def claim(self) -> Job | None:
        """The oldest pending job that is due, now ``running`` (one more attempt)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'pending' AND not_before <= ? ORDER BY id LIMIT 1", (time.time(),)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started = ? WHERE id = ?",
                (time.time(), row[0]),
            )
        return self.job(int(row[0]))

    def job(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def jobs(self, study: str | None = None) -> list[Job]:
        """All jobs in arrival order (of one study when given)."""
        query, args = (
            ("SELECT * FROM jobs WHERE study = ? ORDER BY id", (study,))
            if study
            else ("SELECT * FROM jobs ORDER BY id", ())
        )
        with self._lock:
            return [_job(row) for row in self._db.execute(query, args)]

    def record_outputs(self, job_id: int, sop_instance_uids: Sequence[str]) -> None:
        """Adds what the job is about to store (before it stores it)."""
        self._update_outputs(job_id, lambda known: known + [uid for uid in sop_instance_uids if uid not in known])

    def forget_outputs(self, job_id: int, sop_instance_uids: Sequence[str]) -> None:
        """Removes outputs that were deleted from Orthanc."""
        gone = set(sop_instance_uids)
        self._update_outputs(job_id, lambda known: [uid for uid in known if uid not in gone])

    def _update_outputs(self, job_id: int, change: Callable[[list[str]], list[str]]) -> None:
        with self._transaction() as db:
            known = json.loads(db.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            db.execute("UPDATE jobs SET outputs = ? WHERE id = ?", (json.dumps(change(known)), job_id))

    def finish(self, job_id: int, state: str, reason: str = "", summary: dict[str, Any] | None = None) -> None:
        """Ends a job: ``done``, ``rejected``, ``failed`` or ``superseded``."""
        if state not in FINAL_STATES:
            raise ValueError(f"state {state!r}: not one of {FINAL_STATES}.")
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, summary = ?, finished = ? WHERE id = ?",
                (state, reason, json.dumps(summary or {}), time.time(), job_id),
            )

    def retry_later(self, job_id: int, delay_s: float, reason: str, count_attempt: bool = True) -> None:
        """Back to ``pending`` after ``delay_s``; an attempt that was not the study's fault is not counted."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'pending', not_before = ?, reason = ?, attempts = attempts - ? WHERE id = ?",
                (time.time() + delay_s, reason, 0 if count_attempt else 1, job_id),
            )

    def status(self) -> dict[str, Any]:
        """Counts per state, the queue, the last success and the latest failures (for ``mome-worker status``)."""
        with self._lock:
            counts = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            last = self._db.execute("SELECT MAX(finished) FROM jobs WHERE state = 'done'").fetchone()[0]
            failures = self._db.execute(
                "SELECT study_uid, reason, finished FROM jobs WHERE state = 'failed' ORDER BY finished DESC LIMIT 5"
            ).fetchall()
        return {
            "cursor": self.cursor(),
            "queue": counts.get("pending", 0),
            "running": counts.get("running", 0),
            "jobs": counts,
            "last_success": _iso(last),
            "failures": [{"study_uid": f[0], "reason": f[1], "at": _iso(f[2])} for f in failures],
        }


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=int(row["id"]),
        study=row["study"],
        study_uid=row["study_uid"],
        fingerprint=row["fingerprint"],
        state=row["state"],
        attempts=int(row["attempts"]),
        outputs=tuple(json.loads(row["outputs"])),
        reason=row["reason"],
        summary=json.loads(row["summary"]),
    )


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
