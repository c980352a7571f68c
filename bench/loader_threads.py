"""How much of a training step the batch preparation costs, with and without background loader threads.

The bundle's trainer samples a patch batch and runs the training augmentation of ``configs/train.json`` (affine, noise,
blur, intensity, gamma, flips) on the CPU. On a GPU the network step takes a few tens of milliseconds, so preparing
the next batch in the main thread would leave the GPU idle most of the time. ``Trainer(loader_threads=N)``
(:meth:`scripts.training.PatchSampler.batches`) prepares the next batches in ``N`` threads while the step runs.

This benchmark needs no GPU: the network step is replaced by ``time.sleep(step)``, which, like an asynchronous GPU
step, leaves the CPU and the GIL free. For each patch size, step time and thread count it reports the median seconds
per iteration over ``--repeats`` rounds of ``--iterations`` iterations (configurations interleaved within each round);
the ideal is the step time itself.

Usage (repository root; ``make bench-loader`` first generates held-out synthetic seed 1 there)::

    python bench/loader_threads.py --data .bench/quality_seed1 --out bench/results/loader_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))


def load_sampler(data: Path, patch: int, spacing: float, cases: int):
    """The sampler the training config builds: its preprocessing, augmentation and foreground oversampling."""
    from monai.bundle import ConfigParser

    from scripts.training import PatchSampler, cache_cases, read_datalist

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "train.json"))
    parser.update({"bundle_root": str(REPO / "bundle"), "spacing": [spacing] * 3, "patch_size": [patch] * 3})
    datalist = read_datalist(str(data / "dataset.json"), parser.get_parsed_content("modalities"))[:cases]
    cached = cache_cases(datalist, parser.get_parsed_content("train#preprocessing"))
    augmentation = parser.get_parsed_content("train#augmentation")
    return PatchSampler(cached, [patch] * 3, 2, parser["foreground_fraction"], augmentation, seed=0)


def seconds_per_iteration(sampler, threads: int, step: float, iterations: int, start: int) -> float:
    began = time.perf_counter()
    for _ in sampler.batches(range(start, start + iterations), threads):
        time.sleep(step)  # the GPU step: CPU and GIL are free meanwhile
    return (time.perf_counter() - began) / iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a synthetic dataset (dataset.json)")
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 128], help="cubic patch sizes")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="simulated step seconds")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=int, default=12, help="cases to cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader_threads.json")
    args = parser.parse_args(argv)

    rows = []
    for patch in args.patches:
        spacing = 2.0 if patch <= 64 else 1.0  # 128^3 patches need the 1 mm volumes to be mostly inside the head
        sampler = load_sampler(args.data, patch, spacing, args.cases)
        list(sampler.batches(range(2)))  # warm-up
        configs = [(step, threads) for step in args.steps for threads in args.threads]
        times: dict[tuple, list[float]] = {c: [] for c in configs}
        for round_index in range(args.repeats):
            for step, threads in configs:
                start = 1000 * round_index  # the same batches for every configuration of a round
                times[(step, threads)].append(seconds_per_iteration(sampler, threads, step, args.iterations, start))
        for (step, threads), values in times.items():
            median = statistics.median(values)
            rows.append({"patch": patch, "step_s": step, "threads": threads, "s_per_iteration": round(median, 4)})
            print(f"patch {patch}^3 step {step:.2f} s threads {threads}: {median:.3f} s per iteration", flush=True)

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": __import__("torch").get_num_threads(),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
