"""The equal-compute training benchmark: the demo chain's record, the pricing and the U-Net's resume state."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from bench_modules import load_bench
from monai.bundle import ConfigParser

from scripts.training import build_unet

REPO = Path(__file__).resolve().parents[2]


cost = load_bench("training_cost")
mome_vs_unet = load_bench("mome_vs_unet")


def _logged_iterations(stage: dict) -> int:
    log = REPO / stage["log"]
    if log.suffix == ".txt":  # the classifier warm-up writes one summary line
        return int(re.search(r"(\d+) steps", log.read_text()).group(1))
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if "gate_warmup" in stage:
        rows = [row for row in rows if bool(row.get("gate_warmup")) == stage["gate_warmup"]]
    return sum(row["iterations"] for row in rows)


def test_demo_chain_stages_match_their_training_logs():
    chain = cost.load_chain()
    assert len(chain["stages"]) == 17
    for stage in chain["stages"]:
        assert _logged_iterations(stage) == stage["iterations"], stage["name"]
    totals = cost.chain_iterations(chain)
    assert totals["expert_48"] == 5 * 2500 and totals["expert_64"] == 19500


def test_unknown_stage_kind_is_refused(tmp_path):
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"stages": [{"name": "x", "kind": "expert_96", "iterations": 1}]}))
    with pytest.raises(ValueError, match="expert_96"):
        cost.load_chain(path)


def test_equal_compute_gives_the_unet_the_chains_seconds():
    chain = {"stages": [{"kind": "expert_64", "iterations": 100}, {"kind": "gate_48", "iterations": 10}]}
    result = cost.equal_compute(chain, {"expert_64": 0.5, "gate_48": 1.0, "unet_64": 2.0}, "unet_64")
    assert result["chain_seconds"] == pytest.approx(60.0)
    assert result["unet_iterations"] == 30


def test_baseline_unet_has_about_the_demo_mome_parameter_count():
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    mome = parser.get_parsed_content("network_def")
    topology = {k: parser[k] for k in ("kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder")}
    unet = build_unet(1, 2, features_per_stage=mome_vs_unet.UNET["features_per_stage"], **topology)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert cost.UNET_FEATURES == mome_vs_unet.UNET["features_per_stage"]
    assert count(unet) == pytest.approx(count(mome), rel=0.01)


def test_unet_overrides_cover_both_datasets_and_the_iteration_budget(tmp_path):
    overrides = mome_vs_unet.unet_overrides([tmp_path / "a", tmp_path / "b"], tmp_path / "out", 5010)
    assert overrides["epochs"] == 200  # 25 iterations per epoch
    expected = [str(tmp_path / name / "dataset.json") for name in ("a", "b")]
    assert ast.literal_eval(overrides["dataset_json"]) == expected
    assert overrides["train_modalities"] == "$@modalities"


def test_kept_state_restores_into_a_new_work_folder_only(tmp_path, monkeypatch):
    monkeypatch.setattr(mome_vs_unet, "STATE", tmp_path / "kept")
    first = tmp_path / "session1"
    first.mkdir()
    for name in ("checkpoint_latest.pt", "train_log.jsonl"):
        (first / name).write_text(name)
    mome_vs_unet.keep_state(first)
    second = tmp_path / "session2"
    assert mome_vs_unet.restore_state(second)
    assert (second / "checkpoint_latest.pt").read_text() == "checkpoint_latest.pt"
    assert not (second / "model.pt").exists()
    (second / "checkpoint_latest.pt").write_text("newer")
    assert not mome_vs_unet.restore_state(second)  # never overwrites a run in progress
    assert (second / "checkpoint_latest.pt").read_text() == "newer"


def test_pooled_dice_is_the_mean_over_all_cases_of_a_modality():
    a = {"per_case": [{"modality": "t1", "dice": 0.5}, {"modality": "t2", "dice": 1.0}]}
    b = {"per_case": [{"modality": "t1", "dice": 0.8}, {"modality": "t1", "dice": 0.2}]}
    result = mome_vs_unet.pooled([a, b])
    assert result["t1"] == {"n": 3, "dice": pytest.approx(0.5)}
    assert result["t2"] == {"n": 1, "dice": 1.0}


def test_existing_data_of_another_seed_or_size_is_refused_not_reused(tmp_path):
    made = tmp_path / "data_seed1"
    made.mkdir()
    record = {"generator": {"seed": 1, "subjects": 24}}  # what `make bench-quality` once wrote here
    (made / "dataset.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="seed 1 with 24 subjects.*needs seed 1 with 20"):
        mome_vs_unet.generate(tmp_path, "data_seed1", (1, 20, []))
    record["generator"]["subjects"] = 20
    (made / "dataset.json").write_text(json.dumps(record))
    assert mome_vs_unet.generate(tmp_path, "data_seed1", (1, 20, [])) == made
