"""The robustness corpus (``tests/robustness_corpus.py``) through the application, in-process, with a tiny model.

Every case but the signal ones (``tests/app/test_clean_stop.py`` stops real processes) runs here; ``make
bench-robustness`` runs all of them through the command line with the shipped model and writes a table.
"""

from __future__ import annotations

import pytest
from robustness_corpus import CASES, check_run, load_brain

from app.app import AppOptions
from app.cli.application import run_app


@pytest.fixture(scope="session")
def brain(tmp_path_factory):
    return load_brain(tmp_path_factory.mktemp("corpus_brain"))


@pytest.mark.parametrize("case", [c for c in CASES if not c.command_line_only], ids=lambda c: c.name)
def test_corpus_case(case, tmp_path, capfd, tiny_bundle, brain):
    expected = case.build(tmp_path / "case", brain)
    out = expected.out or tmp_path / "out"
    code = run_app(expected.input, out, tiny_bundle, AppOptions(), prog="mome-app")
    printed = capfd.readouterr()
    problems = check_run(expected, code, printed.out + printed.err, out)
    assert problems == [], f"{case.name}: {problems}\n{printed.err[-3000:]}"
