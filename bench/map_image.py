"""The CPU MAP image: size, build time, cold start, and the demo study through the image beside the same on the host.

Takes an image that ``make map`` built (its build record gives engine, base, size and build seconds) and runs,
interleaved, ``--repeats`` times each:

- *cold start*: a fresh container on a study that is rejected at once (one CT series): container start, the Python
  stack's imports (torch, Holoscan, MONAI), the study scan and the exit (3) — the fixed cost of every MAP run;
- *demo, image*: the demo study (7 series; MoME on DWI, MoME+ on T1/T1ce/T2/FLAIR) through the image, as a MAP runs;
- *demo, host*: the same study through ``python -m app`` in this checkout's environment.

Usage (repository root; ``make bench-map``)::

    .venv/bin/python bench/map_image.py --image mome-app-cpu:VERSION --build-record build/map_build.json [--repeats 3]

Writes ``bench/results/map_image.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from cpu_profiles import machine_facts  # noqa: E402
from publish import publish  # noqa: E402

from app.demo_study import make_demo_study, save_series, series_datasets  # noqa: E402
from app.map_package.image import ENGINES, Engine, detect_engine, run_map  # noqa: E402
from operators.bundle import default_bundle_dir, use_bundle_scripts  # noqa: E402


def make_rejected_study(folder: Path) -> Path:
    """One head CT series: the application rejects the study (exit 3) right after scanning it."""
    volume = np.full((64, 64, 20), 40.0)
    save_series(series_datasets(volume, np.diag([1.0, 1.0, 2.0, 1.0]), 2, "HEAD CT", modality="CT"), folder / "ct")
    return folder


def timed(label: str, expected: int, command) -> float:
    """Seconds that ``command()`` (returning a finished process) took; fails unless it exits ``expected``."""
    started = time.monotonic()
    result = command()
    seconds = round(time.monotonic() - started, 1)
    if result.returncode != expected:
        raise RuntimeError(f"{label}: exit {result.returncode}, expected {expected}\n{result.stderr[-3000:]}")
    return seconds


def run(image: str, engine: Engine, repeats: int, workdir: Path) -> dict[str, Any]:
    demo = workdir / "demo"
    use_bundle_scripts(default_bundle_dir())  # the demo study's generator is the bundle's
    make_demo_study(demo)
    rejected = make_rejected_study(workdir / "rejected")
    rows = []
    for index in range(repeats):
        out = workdir / f"out{index}"
        host = [sys.executable, "-m", "app", "-i", str(demo / "dicom"), "-o", str(out / "host"), "--quiet"]
        rows.append(
            {
                "cold_start_s": timed("cold start", 3, lambda o=out: run_map(image, rejected, o / "rejected", engine)),
                "demo_image_s": timed(
                    "demo, image", 0, lambda o=out: run_map(image, demo / "dicom", o / "map", engine)
                ),
                "demo_host_s": timed("demo, host", 0, lambda c=host: subprocess.run(c, capture_output=True, text=True)),
            }
        )
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return {"machine": machine_facts(), "image": image, "engine": engine.name, "runs": rows, "median": medians}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    machine, build, median = results["machine"], results["build"], results["median"]
    lines = [
        "# The CPU MAP image: size, build, cold start, the demo study (CPU, demo weights)",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, ISA {', '.join(machine['isa_flags'])}, "
        f"torch {machine['torch']} on the host. Image `{results['image']}` built with {build['engine']} "
        f"({build.get('storage') or 'default'} storage) on `{build['base']}`.",
        "",
        f"- Image size: **{build['size_bytes'] / 1e9:.2f} GB**; build: **{build['build_seconds']:.0f} s** "
        "(the build record of `make map`; a rebuild with cached layers takes seconds).",
        "- Cold start (fresh container, imports, study scan, exit 3 on a CT-only study): "
        f"**{median['cold_start_s']} s**.",
        "- Demo study (7 series; MoME on DWI, MoME+ on four contrasts) through the image: "
        f"**{median['demo_image_s']} s**; through `python -m app` on the host: {median['demo_host_s']} s "
        f"(image / host {median['demo_image_s'] / median['demo_host_s']:.2f}).",
        "",
        f"Medians of {len(results['runs'])}, interleaved:",
        "",
        "| run | cold start s | demo, image s | demo, host s |",
        "|---|---|---|---|",
    ]
    for index, row in enumerate(results["runs"], 1):
        lines.append(f"| {index} | {row['cold_start_s']} | {row['demo_image_s']} | {row['demo_host_s']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--engine", choices=("auto", *ENGINES), default="auto")
    parser.add_argument("--build-record", type=Path, required=True, help="the JSON `make map` wrote")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = detect_engine(args.engine)
    with tempfile.TemporaryDirectory(prefix="mome-map-bench-") as folder:
        results = run(args.image, engine, args.repeats, Path(folder))
    results["build"] = json.loads(args.build_record.read_text())
    publish("map_image", results, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
