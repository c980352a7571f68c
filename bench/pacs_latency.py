"""PACS latency: the demo study sent by C-STORE to a real Orthanc, segmented by ``mome-worker``, results back.

Runs ``python -m worker.demo --repeats N --json ...`` (the ``make pacs-demo`` stack: Orthanc with the shipped
configuration, where a study is *stable* 5 s after its last instance, and the worker with its defaults, both on
loopback); each run sends a fresh copy of the demo study (new UIDs, same pixels) and measures, from the last C-STORE
response, the time until the first SEG is in Orthanc and until the study is marked done (2 SEGs, 2 SRs, 2 QC images
stored). The worker's own time per study (download, application, upload) comes from its log. Demo weights, CPU.

Usage (repository root)::

    .venv/bin/python bench/pacs_latency.py [--repeats 3]

Writes ``bench/results/pacs_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from cpu_profiles import machine_facts  # noqa: E402
from publish import publish  # noqa: E402


def worker_seconds(log: Path) -> list[float]:
    """The worker's ``job.ended`` seconds, in order."""
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [event["seconds"] for event in events if event.get("event") == "job.ended"]


def run(workdir: Path, repeats: int) -> dict[str, Any]:
    times = workdir / "times.json"
    command = [sys.executable, "-m", "worker.demo", "--workdir", str(workdir), "--repeats", str(repeats)]
    subprocess.run([*command, "--json", str(times)], check=True, cwd=REPO)
    measured = json.loads(times.read_text())
    runs = measured["runs"]
    for row, seconds in zip(runs, worker_seconds(workdir / "worker" / "worker.log")):
        row["worker_job_s"] = seconds
    return {
        "machine": machine_facts(),
        "stable_age_s": measured["stable_age_s"],
        "runs": runs,
        "median_first_seg_s": statistics.median(r["first_seg_s"] for r in runs),
        "median_done_s": statistics.median(r["done_s"] for r in runs),
        "median_worker_job_s": statistics.median(r.get("worker_job_s", 0.0) for r in runs),
    }


def write_markdown(results: dict[str, Any], path: Path) -> None:
    machine = results["machine"]
    lines = [
        "# PACS latency: demo study by C-STORE -> mome-worker -> results in Orthanc (CPU, demo weights)",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, ISA {', '.join(machine['isa_flags'])}, "
        f"torch {machine['torch']}. Orthanc StableAge {results['stable_age_s']} s (a study is stable that long after "
        "its last instance); the worker reads the change feed every second (`make pacs-demo`'s stack).",
        "",
        f"Median of {len(results['runs'])}: first SEG in Orthanc **{results['median_first_seg_s']} s**, study done "
        f"(2 SEG, 2 SR, 2 QC images stored) **{results['median_done_s']} s** after the last C-STORE; the worker's "
        f"own time per study {results['median_worker_job_s']} s.",
        "",
        "| run | instances | first SEG s | done s | worker job s | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(results["runs"], 1):
        lines.append(
            f"| {index} | {row['instances']} | {row['first_seg_s']} | {row['done_s']} | "
            f"{row.get('worker_job_s', '-')} | {row['MoMEStatus']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mome-pacs-bench-") as folder:
        results = run(Path(folder), args.repeats)
    publish("pacs_latency", results, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
