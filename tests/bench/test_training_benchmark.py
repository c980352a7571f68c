"""The equal-compute training benchmark: the demo chain's record, the pricing and the U-Net's resume state."""

from __future__ import annotations

import ast
import json
import os
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


def test_pooled_metrics_are_the_means_over_all_cases_of_a_modality():
    a = {"per_case": [_case("t1", 0.5, 2.0, 1.0), _case("t2", 1.0, 0.0, 1.0)]}
    b = {"per_case": [_case("t1", 0.8, 1.0, 0.5), _case("t1", 0.2, 0.0, 0.0)]}
    result = mome_vs_unet.pooled([a, b])
    assert result["t1"] == {
        "n": 3,
        "dice": pytest.approx(0.5),
        "abs_volume_error_ml": pytest.approx(1.0),
        "lesion_f1": pytest.approx(0.5),
    }
    assert result["t2"]["n"] == 1 and result["t2"]["dice"] == 1.0
    assert mome_vs_unet.pooled([{"per_case": [{"modality": "t1", "dice": 0.4}]}]) == {"t1": {"n": 1, "dice": 0.4}}


def _case(modality: str, dice: float, volume_error: float, f1: float) -> dict:
    return {"modality": modality, "dice": dice, "abs_volume_error_ml": volume_error, "lesion_f1": f1}


def _split(mome: dict[str, float], unet: dict[str, float]) -> dict:
    return {name: {m: {"n": 1, "dice": d} for m, d in dice.items()} for name, dice in (("mome", mome), ("unet", unet))}


def test_verdict_needs_the_mean_gain_and_no_modality_worse():
    better = mome_vs_unet.verdict(_split({"t1": 0.80, "t2": 0.90}, {"t1": 0.79, "t2": 0.85}))
    assert better["met"] and better["mean_gain"] == pytest.approx(0.03) and better["worst_modality"] == "t1"
    one_worse = mome_vs_unet.verdict(_split({"t1": 0.78, "t2": 0.95}, {"t1": 0.79, "t2": 0.85}))
    assert not one_worse["met"] and one_worse["worst_gain"] == pytest.approx(-0.01)
    too_small = mome_vs_unet.verdict(_split({"t1": 0.80, "t2": 0.86}, {"t1": 0.79, "t2": 0.85}))
    assert not too_small["met"]
    report = {"machine": "m", "training": "t", "splits": {"s": _split({"t1": 1}, {"t1": 0})}}
    text = mome_vs_unet.summary_markdown(report)
    assert "mean of modalities" in text and "Issue 3 expects" not in text  # no verdict in the report, none printed


def _write_run(folder: Path, epochs: int, checkpoint: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "iterations": 25, "best": True, "ema_dice": 0.5} for e in range(epochs)]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "model.pt").write_text("weights")
    if checkpoint:
        (folder / "checkpoint_latest.pt").write_text("resume state")


def test_finished_run_keeps_only_weights_and_log_and_restores_as_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(mome_vs_unet, "STATE", tmp_path / "kept")
    _write_run(tmp_path / "kept", 3)  # an unfinished kept state from an earlier session
    done = tmp_path / "session1"
    _write_run(done, 4)
    assert mome_vs_unet.is_finished(done, 4) and not mome_vs_unet.is_finished(done, 5)
    mome_vs_unet.keep_state(done, finished=True)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["model.pt", "train_log.jsonl"]
    fresh = tmp_path / "session2"
    assert mome_vs_unet.restore_state(fresh)
    assert mome_vs_unet.is_finished(fresh, 4)
    assert len(mome_vs_unet.training_log(fresh)) == 4


def test_a_log_with_a_gap_is_not_finished(tmp_path):
    _write_run(tmp_path, 4, checkpoint=False)
    rows = mome_vs_unet.training_log(tmp_path)
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["epoch"] != 2))
    assert not mome_vs_unet.is_finished(tmp_path, 4)
    (tmp_path / "model_final.pt").write_text("final")
    assert mome_vs_unet.is_finished(tmp_path, 4)


def test_an_evaluation_older_than_the_weights_is_redone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mome_vs_unet.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    weights, out = tmp_path / "models" / "model.pt", tmp_path / "eval.json"
    weights.parent.mkdir()
    weights.write_text("w")
    out.write_text(json.dumps({"per_case": []}))
    os.utime(weights, (out.stat().st_mtime - 10,) * 2)
    assert mome_vs_unet.evaluate(tmp_path, tmp_path, out, None) == {"per_case": []}
    assert calls == []
    os.utime(weights, (out.stat().st_mtime + 10,) * 2)
    mome_vs_unet.evaluate(tmp_path, tmp_path, out, None)
    assert len(calls) == 1 and "--profile" in calls[0]


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
