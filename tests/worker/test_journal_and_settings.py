"""The worker's journal (exactly once per study version, across restarts) and its settings (file, then environment)."""

from __future__ import annotations

import json

import pytest

from worker.journal import Journal
from worker.orthanc import MOME_MANUFACTURER, SeriesInfo
from worker.service import fingerprint
from worker.settings import SettingsError, load_settings


def test_a_study_version_is_queued_once_and_the_cursor_moves_with_it(tmp_path):
    journal = Journal(tmp_path)
    assert journal.cursor() is None
    assert journal.advance(10, [("s1", "1.2.3", "fp-a", 9)]) == [1]
    assert journal.advance(12, [("s1", "1.2.3", "fp-a", 11)]) == []  # the same version again: not a new job
    assert journal.cursor() == 12
    journal.close()
    reopened = Journal(tmp_path)  # a restart keeps both
    assert reopened.cursor() == 12 and [job.fingerprint for job in reopened.jobs()] == ["fp-a"]


def test_a_newer_version_supersedes_one_still_waiting(tmp_path):
    journal = Journal(tmp_path)
    journal.advance(1, [("s1", "1.2.3", "fp-a", 1)])
    journal.advance(2, [("s1", "1.2.3", "fp-b", 2), ("s2", "1.2.4", "fp-c", 2)])
    assert [(job.fingerprint, job.state) for job in journal.jobs()] == [
        ("fp-a", "superseded"),
        ("fp-b", "pending"),
        ("fp-c", "pending"),
    ]
    assert [journal.claim().fingerprint, journal.claim().fingerprint, journal.claim()] == ["fp-b", "fp-c", None]


def test_an_interrupted_job_is_redone_and_remembers_what_it_stored(tmp_path):
    journal = Journal(tmp_path)
    journal.advance(1, [("s1", "1.2.3", "fp-a", 1)])
    job = journal.claim()
    journal.record_outputs(job.id, ["1.2.840.1", "1.2.840.2"])
    journal.close()  # killed here

    restarted = Journal(tmp_path)
    assert restarted.recover() == [job.id]
    again = restarted.claim()
    assert again.id == job.id and again.attempts == 2 and again.outputs == ("1.2.840.1", "1.2.840.2")
    restarted.forget_outputs(job.id, ["1.2.840.1"])
    restarted.retry_later(job.id, 0, "Orthanc unavailable", count_attempt=False)
    assert restarted.claim().attempts == 2 and restarted.job(job.id).outputs == ("1.2.840.2",)
    restarted.finish(job.id, "done", summary={"objects": 3})
    status = restarted.status()
    assert status["jobs"] == {"done": 1} and status["queue"] == 0 and status["last_success"]


def test_a_job_waits_for_its_retry_time(tmp_path):
    journal = Journal(tmp_path)
    journal.advance(1, [("s1", "1.2.3", "fp-a", 1)])
    job = journal.claim()
    journal.retry_later(job.id, 3600, "RuntimeError: boom")
    assert journal.claim() is None and journal.status()["queue"] == 1
    with pytest.raises(ValueError, match="state 'maybe'"):
        journal.finish(job.id, "maybe")


def test_the_fingerprint_leaves_mome_results_out():
    source = [SeriesInfo("a", "1.2.1", "MR", "Siemens", 40), SeriesInfo("b", "1.2.2", "MR", "GE", 30)]
    ours = SeriesInfo("c", "1.2.9", "SEG", MOME_MANUFACTURER, 1)
    assert fingerprint([*source, ours]) == fingerprint(list(reversed(source)))
    assert fingerprint(source) != fingerprint([source[0], SeriesInfo("b", "1.2.2", "MR", "GE", 31)])


def test_settings_come_from_the_file_then_the_environment(tmp_path):
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"orthanc_url": "https://pacs:8042", "jobs": 2, "app_args": ["--mode", "plus"]}))
    settings = load_settings(config, {"MOME_WORKER_JOBS": "3", "MOME_ORTHANC_TLS_VERIFY": "false"})
    assert (settings.orthanc_url, settings.jobs, settings.app_args) == ("https://pacs:8042", 3, ("--mode", "plus"))
    assert settings.verify is False and settings.auth is None
    env = {"MOME_ORTHANC_USER": "mome", "MOME_ORTHANC_PASSWORD": "pw", "MOME_WORKER_APP_ARGS": "--profile fast"}
    settings = load_settings(None, env)
    assert settings.auth == ("mome", "pw") and "pw" not in repr(settings) and settings.app_args == ("--profile", "fast")


@pytest.mark.parametrize(
    ("content", "environ", "message"),
    [
        ({"orthanc_url": "ftp://pacs"}, {}, "orthanc_url 'ftp://pacs'"),
        ({"jobs": 0}, {}, "jobs = 0"),
        ({"colour": "red"}, {}, "unknown setting(s) ['colour']"),
        ({}, {"MOME_ORTHANC_USER": "mome"}, "orthanc_user and orthanc_password go together"),
        ({}, {"MOME_WORKER_PREVIOUS_RESULTS": "archive"}, "previous_results 'archive'"),
        ({}, {"MOME_ORTHANC_TLS_VERIFY": "maybe"}, "orthanc_tls_verify = 'maybe'"),
    ],
)
def test_bad_settings_are_named(tmp_path, content, environ, message):
    config = tmp_path / "worker.json"
    config.write_text(json.dumps(content))
    with pytest.raises(SettingsError) as raised:
        load_settings(config, environ)
    assert message in str(raised.value)
