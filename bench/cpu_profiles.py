"""CPU benchmark of the whole DICOM -> DICOM-SEG pipeline, per inference profile and per stage.

For each model (``demo``: the shipped bundle; ``release``: the authors' architecture - 6 stages, 32-320 features,
patch 128^3, 1 mm - with random weights, which is fine for timing) and each profile, ``mome-seg STUDY -o OUT
--profile P`` runs in a fresh process on a realistic 1 mm study: one axial-oblique 3-D FLAIR-like series,
192 x 256 x 256 voxels of 1 mm (a synthetic glioma subject on MNI152 anatomy, placed in a head-sized field of view).
Recorded per run: the stage seconds of ``report.json`` (DICOM load, registration, resampling to MoME space, network,
inverse mapping, SEG write, QC image), the process wall time and its peak RSS (``wait4``); reported: medians over
``--repeats`` runs, and the machine (CPU model, cores, ISA flags, torch version and threads).

Usage (from the repository root)::

    python bench/cpu_profiles.py --models demo release --profiles fast parity --repeats 3

Writes ``bench/results/cpu_profiles.json`` and ``bench/results/cpu_profiles.md``. The study and the release-size
bundle are cached in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
RESULTS = REPO / "bench" / "results"
STAGES = ("dicom_load", "registration", "to_mome_space", "network", "to_native", "seg_write", "qc_png")
RELEASE_ARCHITECTURE = {
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5,
    "patch_size": [128, 128, 128],
    "spacing": [1.0, 1.0, 1.0],
    "modality_classifier": False,  # as `mome-convert` writes the authors' weights
}
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, relevant ISA flags, memory, torch version, threads and CPU capability."""
    import torch

    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa_flags": sorted(flag for flag in ISA_FLAGS if flag in flags),
        "memory_gb": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_at_start": list(os.getloadavg()),
    }


def make_study(workdir: Path) -> Path:
    """The 1 mm benchmark study (cached): a synthetic glioma subject at 1 mm in a 192 x 256 x 256 oblique grid."""
    study = workdir / "study_1mm"
    if (study / "done").is_file():
        return study
    sys.path.insert(0, str(BUNDLE))
    sys.path.insert(0, str(REPO))
    from app.demo_study import DEMO_SERIES, save_series, series_datasets
    from scripts.synthetic import generate_subject, render

    rng = np.random.default_rng([2026, 6])
    subject = generate_subject(rng, spacing=1.0, lesion_weights={"glioma": 1.0})
    brain = render(subject, "flair", rng)  # 160 x 196 x 160 at 1 mm, MoME space
    head = np.zeros((192, 256, 256), dtype=np.float32)
    offset = [(h - b) // 2 for h, b in zip(head.shape, brain.shape)]
    head[tuple(slice(o, o + b) for o, b in zip(offset, brain.shape))] = brain
    # the same voxels in scanner space: rotated 8 / -5 / 4 degrees about x / y / z and shifted, 1 mm isotropic
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.radians([8.0, -5.0, 4.0]))
    affine[:3, 3] = subject.affine[:3, 3] - affine[:3, :3] @ np.array(offset, float) + np.array([6.0, -9.0, 12.0])
    number, description, extra = DEMO_SERIES["flair"]
    shutil.rmtree(study, ignore_errors=True)
    save_series(series_datasets(head, affine, number, "AX 3D FLAIR 1mm", extra=extra), study / "dicom")
    (study / "done").write_text(description)
    return study


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bundle_copy(source: Path, out: Path, config_changes: dict[str, Any]) -> Path:
    """``source`` copied afresh to ``out`` without its weights, with ``config_changes`` applied to inference.json."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.pt", "__pycache__", "training", "eval"))
    config_path = out / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    return out


def make_release_bundle(workdir: Path) -> Path:
    """A copy of the bundle with the authors' release architecture and random (seeded) weights.

    The code and configs are copied afresh on every call, so the benchmark always runs this checkout's code; the
    weights (deterministic, ~0.7 GB) are generated once in ``workdir`` and linked.
    """
    out = _bundle_copy(BUNDLE, workdir / "release_bundle", RELEASE_ARCHITECTURE)
    weights = (workdir / "release_model.pt").resolve()
    if not weights.is_file():
        code = (
            "import torch; from monai.bundle import ConfigParser; torch.manual_seed(0); p = ConfigParser(); "
            f"p.read_config({str(out / 'configs' / 'inference.json')!r}); n = p.get_parsed_content('network_def'); "
            f"torch.save(n.state_dict(), {str(weights)!r})"
        )
        subprocess.run([sys.executable, "-c", code], cwd=out, env={**os.environ, "PYTHONPATH": str(out)}, check=True)
    (out / "models" / "model.pt").symlink_to(weights)
    return out


def make_whole_volume_bundle(release: Path) -> Path:
    """A copy of the release-size bundle whose ``fast`` profile runs one whole-volume tile (the ``tile_scale`` lever).

    Timing and memory only: this lever fails the quality guard on the demo model (bench/results/profile_agreement.md).
    """
    whole_volume = {"tile_scale": "$float('inf')", "tile_step": 1.0}
    out = _bundle_copy(release, release.parent / "release_bundle_whole_volume", whole_volume)
    (out / "models" / "model.pt").symlink_to((release / "models" / "model.pt").resolve())
    return out


def run_once(study: Path, bundle: Path, profile: str, out: Path, device: str = "cpu") -> dict[str, Any]:
    """One ``mome-seg`` process on the study: its stage seconds, wall seconds and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    entry = "import sys; from app.cli import seg_main; sys.exit(seg_main())"
    command = [sys.executable, "-c", entry, str(study / "dicom"), "-o", str(out)]
    command += ["--model", str(bundle), "--profile", profile, "--device", device, "--quiet"]
    env = {**os.environ, "HOLOSCAN_LOG_LEVEL": "ERROR", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_holoscan_stack
    )
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mome-seg failed ({profile}, {bundle.name}):\n{output[-3000:]}")
    report = json.loads(next(out.glob("*/report.json")).read_text())
    series = next(entry for entry in report["segmented"].values() if "seg" in entry)
    return {
        "seconds": {stage: series["seconds"].get(stage) for stage in STAGES},
        "wall_seconds": round(wall, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "inference": series.get("inference", {}),
        "lesion_ml": series.get("lesion_volume_ml"),
    }


def _holoscan_stack() -> None:
    """Holoscan wants a 32 MB stack (``ulimit -s 32768``)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = 32 * 2**20
    if soft != resource.RLIM_INFINITY and soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    return {
        "repeats": len(runs),
        "median_seconds": {stage: median([r["seconds"][stage] for r in runs]) for stage in STAGES},
        "median_wall_seconds": median([r["wall_seconds"] for r in runs]),
        "max_peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "inference": runs[-1]["inference"],
    }


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# CPU profiles: DICOM study -> DICOM-SEG, per stage (`bench/cpu_profiles.py`)",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, ISA {', '.join(machine['isa_flags'])}, "
        f"{machine['memory_gb']} GB, torch {machine['torch']} ({machine['torch_threads']} threads, "
        f"{machine['torch_cpu_capability']}); load average at start {machine['load_average_at_start'][0]:.2f}.",
        f"Study: {results['study']}. Device: {results['device']}. Medians over the runs (column `runs`); seconds per "
        "stage from report.json,",
        "wall = the whole `mome-seg` process (imports, graph, model load included), RSS = its peak.",
        "",
        "| model | profile | runs | tiles | DICOM load | registration | to MoME | network | to native | SEG write | QC "
        "| wall | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, profiles in results["runs"].items():
        for profile, summary in profiles.items():
            s, info = summary["median_seconds"], summary["inference"]
            tiles = f"{info.get('n_tiles', '?')} x {info.get('tile_size', '?')}"
            cells = [s[stage] for stage in STAGES]
            lines.append(
                f"| {model} | {profile} | {summary['repeats']} | {tiles} | " + " | ".join(f"{c}" for c in cells)
                + f" | {summary['median_wall_seconds']} | {summary['max_peak_rss_gb']} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "release"], choices=["demo", "release"])
    parser.add_argument("--profiles", nargs="+", default=["fast", "parity"], choices=["fast", "parity", "accurate"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per profile (demo model)")
    parser.add_argument("--release-repeats", type=int, default=1, help="runs per profile (release model, ~25 min each)")
    parser.add_argument(
        "--release-profiles", nargs="+", choices=["fast", "parity", "accurate"], help="default: --profiles"
    )
    parser.add_argument(
        "--release-whole-volume", action="store_true",
        help="also time the release model's fast profile with one whole-volume tile (model `release_whole_volume`)",
    )  # fmt: skip
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU path (AMP)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_profiles.json")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    study = make_study(args.workdir)
    bundles = {"demo": BUNDLE} if "demo" in args.models else {}
    if "release" in args.models:
        bundles["release"] = make_release_bundle(args.workdir)
        if args.release_whole_volume:
            bundles["release_whole_volume"] = make_whole_volume_bundle(bundles["release"])
    results: dict[str, Any] = {"machine": machine_facts(), "device": args.device, "runs": {}}
    results["study"] = "1 axial-oblique 3-D FLAIR, 192 x 256 x 256 x 1 mm, synthetic glioma"
    for model in bundles:
        profiles = (args.release_profiles or args.profiles) if model == "release" else args.profiles
        profiles = ["fast"] if model == "release_whole_volume" else profiles
        runs: dict[str, list] = {profile: [] for profile in profiles}
        repeats = args.repeats if model == "demo" else args.release_repeats
        for repeat in range(repeats):  # profiles interleaved, each run a fresh process: drift hits all alike
            for profile in profiles:
                runs[profile].append(run_once(study, bundles[model], profile, args.workdir / "out", args.device))
                print(f"{model} {profile} #{repeat + 1}: {json.dumps(runs[profile][-1])}", flush=True)
        results["runs"][model] = {profile: {**summarise(rs), "runs": rs} for profile, rs in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
