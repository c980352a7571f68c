"""``bench/robustness.py``: one case through the real command line, and the table with its totals."""

from __future__ import annotations

import json

from bench_modules import load_bench


def test_a_rejected_case_through_the_command_line_and_the_table(tmp_path):
    bench = load_bench("robustness")
    case = next(c for c in bench.CASES if c.name == "iop-half-length")
    row = bench.run_case(case, tmp_path / "work", bench.REPO / "bundle", None)
    assert row["exit"] == 3 == row["expected_exit"] and row["passed"], row
    assert "not unit length" in row["message"]
    failed = {**row, "case": "made-up", "passed": False, "problems": ["exit code 1, expected 3"]}
    machine = {"cpu": "test CPU", "usable_cpus": 2, "isa_flags": ["avx2"]}
    bench.write_results([row, failed], machine, bench.REPO / "bundle", tmp_path / "results")
    payload = json.loads((tmp_path / "results" / "robustness.json").read_text())
    assert payload["summary"] == {"cases": 2, "passed": 1}
    assert payload["classes"]["geometry"] == {"cases": 2, "passed": 1}
    table = (tmp_path / "results" / "robustness.md").read_text()
    assert "1 of 2 cases" in table and "FAIL: exit code 1, expected 3" in table and "test CPU" in table
