"""Issue 37, lever 1 probe: one release-size MoME tile with ``nn`` instance norm vs the fused inference norm.

Both runs use the network cast to bfloat16 once and channels-last 3-D (the native-bf16 path), in one process,
alternating (nn, fused, nn, fused), with one warm-up call per arm; random weights (speed only: the equivalence of
the fused op is in ``tests/bundle/test_fused_norm.py``). Also times the op alone on one 32-channel activation.

Usage (repository root)::

    .venv/bin/python bench/fused_norm_probe.py [--size 96] [--repeats 2]

Writes ``bench/results/fused_norm_probe.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "bundle"))

from cpu_levers import build  # noqa: E402
from cpu_profiles import machine_facts  # noqa: E402
from publish import publish  # noqa: E402

import scripts.unet as unet  # noqa: E402
from scripts.fused_norm import instance_norm_leaky_relu_  # noqa: E402

NN_FORWARD = unet.ConvNormAct.forward


def fused_forward(self: unet.ConvNormAct, x: torch.Tensor) -> torch.Tensor:
    norm, slope = self.norm, self.act.negative_slope
    return instance_norm_leaky_relu_(self.conv(x), norm.weight, norm.bias, norm.eps, slope)


def seconds(call, repeats: int) -> list[float]:
    call()  # warm-up: kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(round(time.perf_counter() - started, 3))
    return times


def op_alone(repeats: int = 7) -> dict[str, float]:
    """Milliseconds of norm + LeakyReLU on a 32 x 96^3 bfloat16 channels-last activation, nn vs fused (median)."""
    norm = torch.nn.InstanceNorm3d(32, affine=True).bfloat16()
    x = torch.randn(1, 32, 96, 96, 96).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    arms = {
        "nn": lambda t: F.leaky_relu_(norm(t), 0.01),
        "fused": lambda t: instance_norm_leaky_relu_(t, norm.weight, norm.bias),
    }
    result = {}
    for name, function in arms.items():
        times = []
        for _ in range(repeats):
            copy = x.clone()
            started = time.perf_counter()
            function(copy)
            times.append(time.perf_counter() - started)
        result[f"{name}_ms"] = round(statistics.median(times) * 1e3, 1)
    return result


def run(size: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    network = build("release").eval().to(torch.bfloat16).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, size, size, size).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    tiles: dict[str, list[float]] = {"nn": [], "fused": []}
    with torch.inference_mode():
        for arm in ("nn", "fused", "nn", "fused"):
            unet.ConvNormAct.forward = NN_FORWARD if arm == "nn" else fused_forward
            tiles[arm] += seconds(lambda: network.forward_lean(x), repeats)
        unet.ConvNormAct.forward = NN_FORWARD
        alone = op_alone()
    medians = {arm: statistics.median(times) for arm, times in tiles.items()}
    return {"machine": machine_facts(), "size": size, "tiles_s": tiles, "median_s": medians, "op_alone": alone}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    machine, median, alone, size = results["machine"], results["median_s"], results["op_alone"], results["size"]
    lines = [
        "# Issue 37 probe: fused inference instance norm + LeakyReLU (bf16, channels-last, release-size MoME)",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, ISA {', '.join(machine['isa_flags'])}, "
        f"torch {machine['torch']}. Random weights; network cast to bf16 once, channels-last 3-D, `forward_lean`.",
        "",
        f"- One {size}^3 tile (5 experts + gate): nn **{median['nn']:.2f} s**, fused **{median['fused']:.2f} s** "
        f"(x{median['nn'] / median['fused']:.2f}); medians of {len(results['tiles_s']['nn'])}, arms alternating.",
        f"- Norm + LeakyReLU alone on 32 x 96^3: nn {alone['nn_ms']} ms (returns channels-first), "
        f"fused {alone['fused_ms']} ms (in place, channels-last).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    publish("fused_norm_probe", run(args.size, args.repeats), write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
