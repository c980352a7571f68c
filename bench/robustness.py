"""Robustness benchmark (``make bench-robustness``): every case of the corpus through the real command line.

Each case of ``tests/robustness_corpus.py`` is written into ``--workdir``, run as ``python -m app -i INPUT -o OUT -m
BUNDLE`` (the shipped demo model by default) in its own process, and checked (``check_run``): exit code, message,
nothing partial written, no staging left, no patient data or raw control character on the console, the report's
checks for inputs that are segmented. The signal cases send SIGTERM / SIGINT once the run is registering and also
check that the run's temporary folder is left empty. Writes ``bench/results/robustness.json`` and ``.md`` (a table
per case, the totals per class and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bundle"), str(REPO / "bench")]

from cpu_profiles import machine_facts  # noqa: E402
from robustness_corpus import CASES, CLASSES, Case, check_run, load_brain  # noqa: E402

RESULTS = REPO / "bench" / "results"


def run_case(case: Case, workdir: Path, bundle: Path, brain: Any) -> dict[str, Any]:
    """Builds and runs one case; returns its row."""
    folder = workdir / case.name
    shutil.rmtree(folder, ignore_errors=True)
    expected = case.build(folder / "case", brain)
    out = expected.out or folder / "out"
    scratch = folder / "tmp"
    scratch.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(scratch), "HOLOSCAN_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "app", "-i", str(expected.input), "-o", str(out), "-m", str(bundle)]
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    console = ""
    if expected.signal:
        console = _stop_when_registering(process, getattr(signal, expected.signal))
    stdout, stderr = process.communicate(timeout=3600)
    seconds = time.perf_counter() - started
    console += stdout + stderr
    problems = check_run(expected, process.returncode, console, out)
    if expected.signal and any(scratch.iterdir()):
        problems.append("files left in the run's temporary folder")
    return {
        "case": case.name,
        "class": case.issue_class,
        "expected_exit": expected.exit_code,
        "exit": process.returncode,
        "seconds": round(seconds, 1),
        "passed": not problems,
        "problems": problems,
        "message": _last_line(console),
    }


def _stop_when_registering(process: subprocess.Popen, signum: int) -> str:
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "registering" in line:
            process.send_signal(signum)
            break
    return "".join(lines)


def _last_line(console: str) -> str:
    lines = [line for line in console.splitlines() if line.strip() and not line.startswith("[")]
    return lines[-1][:300] if lines else ""


def write_results(rows: list[dict[str, Any]], machine: dict[str, Any], bundle: Path, results: Path = RESULTS) -> None:
    """``robustness.json`` and ``robustness.md`` in ``results``: every case, totals per class, the machine."""
    results.mkdir(parents=True, exist_ok=True)
    totals = {
        name: {
            "cases": sum(r["class"] == name for r in rows),
            "passed": sum(r["class"] == name and r["passed"] for r in rows),
        }
        for name in CLASSES
    }
    summary = {"cases": len(rows), "passed": sum(r["passed"] for r in rows)}
    payload = {"machine": machine, "bundle": str(bundle), "summary": summary, "classes": totals, "cases": rows}
    (results / "robustness.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Robustness corpus through `python -m app` (`make bench-robustness`)",
        "",
        f"{summary['passed']} of {summary['cases']} cases behave as specified. Model: the bundle's demo weights. "
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, ISA {', '.join(machine['isa_flags'])}.",
        "",
        "| class | cases | passed |",
        "|---|---|---|",
        *[f"| {CLASSES[name]} | {t['cases']} | {t['passed']} |" for name, t in totals.items() if t["cases"]],
        "",
        "| case | class | exit (expected) | seconds | result | message |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = "ok" if row["passed"] else "FAIL: " + "; ".join(row["problems"])
        message = row["message"].replace("|", "\\|")
        lines.append(
            f"| {row['case']} | {row['class']} | {row['exit']} ({row['expected_exit']}) | {row['seconds']} | "
            f"{result} | {message} |"
        )
    (results / "robustness.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "robustness")
    parser.add_argument("--model", type=Path, default=REPO / "bundle", help="bundle folder (default: the demo model)")
    parser.add_argument("--cases", nargs="+", help="only these cases (default: all)")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if not args.cases or case.name in args.cases]
    machine = machine_facts()
    brain = load_brain(args.workdir / "brain")
    rows = []
    for case in cases:
        row = run_case(case, args.workdir, args.model.resolve(), brain)
        print(f"{row['case']:28s} exit {row['exit']} ({row['expected_exit']}) {row['seconds']:7.1f} s "
              f"{'ok' if row['passed'] else row['problems']}", flush=True)  # fmt: skip
        rows.append(row)
    write_results(rows, machine, args.model.resolve())
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
