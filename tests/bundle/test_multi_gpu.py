"""Data-parallel training (configs/multi_gpu_train.json under torchrun): two processes follow one process.

Run on the CPU with the gloo backend: DDP, the sharded sampler, the world-size scaling of the summed expert loss and
rank-0-only writing are the same code on GPUs (only the backend and device differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.training import PatchSampler

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
SMALL = {
    "patch_size": "[16,16,16]",
    "features_per_stage": "[4,8,16,32]",
    "val_fraction": "0.34",
    "epochs": "2",
    "iterations_per_epoch": "2",
    "batch_size": "2",
    "progress": "False",
    "amp": "False",
    "channels_last": "False",
    # float32 in both runs, whatever the CPU: the tolerance below is float32's
    "cpu_bf16": "False",
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(BUNDLE), "OMP_NUM_THREADS": "1"}


def _generate(out: Path, *options: str) -> Path:
    args = [sys.executable, "-m", "scripts.synthetic", "--out", str(out), "--cases", "3", "--seed", "0"]
    subprocess.run([*args, "--spacing", "4", "--quiet", *options], cwd=BUNDLE, env=_env(), check=True)
    return out


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-contrast cases (MoME, experts) and multi-channel BraTS-label cases (MoME+)."""
    root = tmp_path_factory.mktemp("ddp")
    return {
        "single": _generate(root / "single", "--all-contrasts"),
        "plus": _generate(root / "plus", "--multichannel", "--label-scheme", "brats", "--lesion-types", "glioma=1"),
    }


def _train(config: str, out: Path, data: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "monai.bundle"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launcher += ["-m", "monai.bundle"]
        config = f"['configs/{config}','configs/multi_gpu_train.json']"
    else:
        config = f"configs/{config}"
    args = [*launcher, "run", "--config_file", config, "--bundle_root", ".", "--dataset_dir", str(data)]
    for key, value in SMALL.items():
        args += [f"--{key}", value]
    args += ["--output_dir", str(out), *extra]
    return subprocess.run(args, cwd=BUNDLE, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "config, data, extra",
    [
        ("train.json", "single", ("--init_experts", "False")),
        ("train_expert.json", "single", ("--expert_modality", "flair")),
        ("train_plus.json", "plus", ("--init_experts", "False")),
        # frozen experts in the first epoch (DDP must allow unused parameters), the classifier warmed up on every rank
        (
            "train.json",
            "single",
            (
                "--init_experts",
                "False",
                "--gate_warmup_epochs",
                "1",
                "--modality_classifier",
                "True",
                "--classifier_warmup_steps",
                "2",
            ),
        ),
    ],
    ids=["mome", "expert", "momeplus", "mome-warm-ups"],
)
def test_two_processes_train_like_one(tmp_path, tiny_datasets, config, data, extra):
    tiny_dataset = tiny_datasets[data]
    single = _train(config, tmp_path / "one", tiny_dataset, 1, *extra)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _train(config, tmp_path / "two", tiny_dataset, 2, *extra)
    assert double.returncode == 0, double.stderr[-3000:]

    one = torch.load(tmp_path / "one" / "model_final.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "model_final.pt", weights_only=True)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    logs = [(tmp_path / run / "train_log.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 2, "rank 0 alone writes the log, one line per epoch"
    for line_one, line_two in zip(*logs):
        record_one, record_two = json.loads(line_one), json.loads(line_two)
        assert record_two["loss"] == pytest.approx(record_one["loss"], rel=1e-4)  # mean over both replicas
        assert record_two["val_dice"].keys() == record_one["val_dice"].keys()
    assert double.stderr.count("epoch 2/2") == 1, "only rank 0 logs"


def test_sampler_shards_split_the_batch_of_one_process():
    cases = [{"image": torch.rand(1, 12, 12, 12), "label": (torch.rand(1, 12, 12, 12) > 0.9).long()} for _ in range(3)]
    whole = PatchSampler(cases, (8, 8, 8), batch_size=4, seed=5).batch(7)
    shards = [PatchSampler(cases, (8, 8, 8), batch_size=4, seed=5, rank=r, world_size=2).batch(7) for r in (0, 1)]
    for key in ("image", "label"):
        torch.testing.assert_close(torch.cat([s[key] for s in shards]), whole[key], rtol=0, atol=0)
    assert shards[1]["image"].shape[0] == 2
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        PatchSampler(cases, (8, 8, 8), batch_size=3, world_size=2)
