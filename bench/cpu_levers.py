"""Micro-benchmark of the CPU inference levers, one MoME forward per measurement, each lever in a fresh process.

Levers (``--levers``): ``baseline`` (no_grad, float32, gate input concatenated as upstream does), ``inference_mode``,
``lean_gate`` (inference_mode + the gate's first convolution accumulated per expert: the bundle's default forward),
``bf16`` (lean + bfloat16 autocast), ``channels_last`` (lean + channels_last_3d), ``threads1`` (lean on one thread),
``batch2`` (lean, two tiles per call; time per tile), ``compile`` (lean + ``torch.compile``; the first call's
compile time is reported separately). Per lever: median seconds per tile over ``--repeats`` calls after one
warm-up call, the first call, and the process's peak RSS.

Usage (from the repository root)::

    python bench/cpu_levers.py --arch release --size 128 128 128 --levers baseline lean_gate bf16 threads1

Writes ``bench/results/cpu_levers_<arch>.json`` (and prints a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LEVERS = ("baseline", "inference_mode", "lean_gate", "bf16", "channels_last", "threads1", "batch2", "compile")
ARCHITECTURES = {
    "demo": {"features_per_stage": [8, 16, 32, 64], "n_stages": 4},
    "release": {"features_per_stage": [32, 64, 128, 256, 320, 320], "n_stages": 6},
}


def build(arch: str):
    from scripts.networks import MoME

    spec = ARCHITECTURES[arch]
    n = spec["n_stages"]
    return MoME(
        num_experts=5, in_channels=1, num_classes=2, features_per_stage=spec["features_per_stage"],
        kernel_sizes=[3] * n, strides=[1] + [2] * (n - 1), n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[2] * (n - 1),
    ).eval()  # fmt: skip


def measure(arch: str, size: list[int], lever: str, repeats: int) -> dict[str, Any]:
    """Runs in the child process: times one lever."""
    import torch

    torch.manual_seed(0)
    if lever == "threads1":
        torch.set_num_threads(1)
    network = build(arch)
    batch = 2 if lever == "batch2" else 1
    x = torch.randn(batch, 1, *size)
    if lever == "channels_last":
        network = network.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)

    def concatenated(t):
        experts, weights = network._run(t, None, False)
        return network.fuse([levels[0] for levels in experts], weights[0])

    forward = concatenated if lever in ("baseline", "inference_mode") else network.forward_lean
    if lever == "compile":
        forward = torch.compile(network.forward_lean, dynamic=False)
    grad_context = torch.no_grad if lever == "baseline" else torch.inference_mode

    def call():
        with grad_context():
            if lever == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return forward(x)
            return forward(x)

    started = time.perf_counter()
    call()
    first = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append((time.perf_counter() - started) / batch)
    return {
        "lever": lever,
        "median_seconds_per_tile": round(statistics.median(seconds), 3),
        "first_call_seconds": round(first, 2),
        "seconds": [round(s, 3) for s in seconds],
        "threads": torch.get_num_threads(),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="release")
    parser.add_argument("--size", type=int, nargs=3, default=None, help="tile size (default: the arch's patch)")
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=["baseline", "lean_gate", "bf16", "threads1"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = args.size or ([128] * 3 if args.arch == "release" else [48] * 3)
    if args.child:
        print(json.dumps(measure(args.arch, size, args.child, args.repeats)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    rows = []
    for lever in args.levers:
        command = [sys.executable, __file__, "--arch", args.arch, "--size", *map(str, size), "--child", lever,
                   "--repeats", str(args.repeats)]  # fmt: skip
        process = subprocess.run(command, env=env, capture_output=True, text=True)
        if process.returncode == 0:
            rows.append(json.loads(process.stdout.strip().splitlines()[-1]))
        else:  # e.g. torch.compile without a working C++ toolchain: record why, keep going
            rows.append({"lever": lever, "error": (process.stderr.strip().splitlines() or ["failed"])[-1][:300]})
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or RESULTS / f"cpu_levers_{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arch": args.arch, "size": size, "load_average": list(os.getloadavg()),
                               "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(markdown(rows))
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table of seconds per tile, ratio to the first lever, first call and peak RSS."""
    base = rows[0].get("median_seconds_per_tile")
    lines = [
        f"| lever | s/tile | speed-up vs {rows[0]['lever']} | first call s | peak RSS GB |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['lever']} | failed: {row['error']} | | | |")
            continue
        ratio = base / row["median_seconds_per_tile"] if base else float("nan")
        lines.append(f"| {row['lever']} | {row['median_seconds_per_tile']} | {ratio:.2f}x | "
                     f"{row['first_call_seconds']} | {row['peak_rss_gb']} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
