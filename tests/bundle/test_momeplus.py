"""MoME+: dispatch constraints, all 15 availability patterns, loss, data handling, training, bundle and converter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from upstream_factory import plans_v22, reference_momeplus, write_momeplus_checkpoint_set

from scripts import networks
from scripts.losses import MoMEPlusLoss, curriculum_weight
from scripts.networks import DispatchMLP, MoMEPlus, constrain_dispatch
from scripts.plus import LoadModalitiesd, availability_patterns, multichannel_datalist, pattern_name, prepare_plus_batch
from scripts.training import PlusPatchSampler, Trainer, read_plus_datalist

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "bundle"
MODALITIES = ("t1", "t1ce", "t2", "flair")
SMALL = {
    "features_per_stage": [4, 8, 8],
    "kernel_sizes": [3, 3, 3],
    "strides": [1, 2, 2],
    "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1],
}
RELEASE = {
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [3] * 6,
    "strides": [1, 2, 2, 2, 2, 2],
    "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5,
}
PATTERNS = availability_patterns(4)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plus(seed: int = 0, classes: int = 4) -> MoMEPlus:
    torch.manual_seed(seed)
    return MoMEPlus(4, classes, **SMALL)


# -- network -----------------------------------------------------------------------------------------------------------
def test_release_parameter_counts_match_the_authors():
    with torch.device("meta"):
        model = MoMEPlus(4, 4, **RELEASE)
    assert n_params(model.experts[0]) == 31_197_204
    assert n_params(model.gate) == 31_330_288
    assert n_params(model.dispatch) == 476
    assert tuple(model.gate.upsample[0].weight.shape) == (324, 320, 2, 2, 2)
    assert model.gate.encoder[0][0].conv.in_channels == 4 + 4 * 32
    assert model.gate.heads[-1].out_channels == 16


def test_availability_patterns_are_the_15_non_empty_subsets():
    assert len(PATTERNS) == 15 == len(set(PATTERNS))
    assert all(sum(p) >= 1 and set(p) <= {0, 1} for p in PATTERNS)
    assert PATTERNS[-1] == (1, 1, 1, 1) and pattern_name(PATTERNS[-1], MODALITIES) == "t1+t1ce+t2+flair"
    assert pattern_name((0, 1, 0, 1), MODALITIES) == "t1ce+flair"


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "".join(map(str, p)))
def test_dispatch_constraints_for_every_pattern(pattern):
    c = torch.tensor([pattern], dtype=torch.float32)
    raw = torch.randn(1, 4, 4) * 3
    d = constrain_dispatch(raw, c)[0]
    for i in range(4):
        if pattern[i]:  # available: passes through unchanged
            assert torch.equal(d[i], torch.eye(4)[i])
        else:  # missing: a mix of available sources only, entries in (0, 1]
            assert torch.all(d[i][c[0] == 0] == 0)
            assert torch.all((d[i][c[0] == 1] > 0) & (d[i][c[0] == 1] <= 1))
    assert torch.all(d[:, c[0] == 0] == 0), "columns of missing modalities are zero"


def test_single_available_modality_fills_every_channel_with_a_positive_multiple_of_it():
    model = _plus().eval()
    x = torch.randn(1, 4, 8, 8, 8)
    for i in range(4):
        c = torch.zeros(1, 4)
        c[0, i] = 1
        s, d = model.dispatched(x, c)
        assert torch.equal(s[:, i], x[:, i])
        for j in range(4):
            assert torch.count_nonzero(d[0, j]) == 1 and d[0, j, i] > 0
            torch.testing.assert_close(s[:, j], d[0, j, i] * x[:, i])


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "".join(map(str, p)))
def test_every_pattern_runs_and_ignores_the_content_of_missing_channels(pattern):
    model = _plus().eval()
    c = torch.tensor([pattern], dtype=torch.float32)
    x = torch.randn(1, 4, 8, 12, 8)
    noise = torch.randn_like(x) * 5 * (1 - c)[:, :, None, None, None]
    with torch.no_grad():
        y = model(x, c)
        y_noisy = model(x + noise, c)
    assert y.shape == (1, 4, 8, 12, 8) and torch.isfinite(y).all()
    torch.testing.assert_close(y, y_noisy, rtol=0, atol=0)


def test_prior_changes_the_output_and_availability_can_be_derived_from_zero_channels():
    model = _plus().eval()
    x = torch.randn(1, 4, 8, 8, 8)
    x[:, 2] = 0
    with torch.no_grad():
        derived = model(x)
        explicit = model(x, torch.tensor([[1.0, 1, 0, 1]]))
        other = model(x, torch.tensor([[1.0, 0, 0, 1]]))
    torch.testing.assert_close(derived, explicit, rtol=0, atol=0)
    assert not torch.allclose(explicit, other)


def test_one_availability_row_is_broadcast_over_a_batch_of_tiles_and_bad_vectors_are_rejected():
    model = _plus().eval()
    x = torch.randn(3, 4, 8, 8, 8)
    c = torch.tensor([[0.0, 1, 1, 0]])
    with torch.no_grad():
        together = model(x, c)
        alone = torch.cat([model(x[i : i + 1], c) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    for bad, match in (
        (torch.zeros(1, 4), "at least one"),
        (torch.tensor([[0.5, 1, 1, 1]]), "0/1"),
        (torch.ones(2, 4), "rows for a batch"),
    ):
        with pytest.raises(ValueError, match=match):
            model(x, bad)
    with pytest.raises(ValueError, match="4 input channels"):
        model(torch.randn(1, 3, 8, 8, 8), torch.ones(1, 3))


def test_lean_gate_path_equals_the_concatenated_path(monkeypatch):
    model = _plus().eval()
    x, c = torch.randn(1, 4, 8, 8, 8), torch.tensor([[1.0, 0, 1, 0]])
    with torch.no_grad():
        standard = model(x, c)
        monkeypatch.setattr(networks, "LEAN_GATE_MIN_BYTES", 0)
        lean = model(x, c)
    torch.testing.assert_close(lean, standard, rtol=1e-5, atol=1e-5)


def test_training_output_follows_the_fusion_rule_and_reports_dispatch():
    model = _plus().train()
    c = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 1]])
    out = model(torch.randn(2, 4, 8, 8, 8), c)
    assert out["dispatch"].shape == (2, 4, 4) and torch.equal(out["availability"], c)
    for level, weights in enumerate(out["weights"]):
        assert weights.shape[1] == 16
        expected = sum(out["experts"][k][level] * weights[:, 4 * k : 4 * k + 4] for k in range(4))
        torch.testing.assert_close(out["fused"][level], expected)


def test_dispatch_mlp_layout_is_the_authors():
    mlp = DispatchMLP(4)
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (4, 4), "mlp.0.bias": (4,), "mlp.2.weight": (8, 4), "mlp.2.bias": (8,),
        "mlp.4.weight": (16, 8), "mlp.4.bias": (16,), "mlp.6.weight": (16, 16), "mlp.6.bias": (16,),
    }  # fmt: skip
    assert mlp(torch.ones(3, 4)).shape == (3, 4, 4)


# -- loss --------------------------------------------------------------------------------------------------------------
def _outputs(model: MoMEPlus, c: torch.Tensor):
    torch.manual_seed(1)
    return model.train()(torch.randn(c.shape[0], 4, 8, 8, 8), c), torch.randint(0, 4, (c.shape[0], 1, 8, 8, 8)).float()


def test_expert_loss_averages_over_available_experts_only():
    model = _plus()
    loss = MoMEPlusLoss(levels=2)
    c = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    out, target = _outputs(model, c)
    ds = loss.deep_supervision
    per = [[ds([lvl[b : b + 1] for lvl in out["experts"][k]], target[b : b + 1]) for k in range(4)] for b in range(2)]
    expected = (per[0][0] + per[0][2]) / 2 + per[1][3]
    torch.testing.assert_close(loss.expert_loss(out["experts"], target, c), expected)
    mean = MoMEPlusLoss(levels=2, expert_reduction="mean")
    torch.testing.assert_close(mean.expert_loss(out["experts"], target, c), expected / 2)


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_curriculum_is_applied_unless_switched_off(r):
    model = _plus()
    c = torch.tensor([[1.0, 1, 0, 0]])
    out, target = _outputs(model, c)
    applied = MoMEPlusLoss(levels=2)(out, target, r)
    w = curriculum_weight(r, 2.0)
    torch.testing.assert_close(applied["loss"], w * applied["expert"] + (1 - w) * applied["fused"])
    upstream = MoMEPlusLoss(levels=2, curriculum=False)(out, target, r)
    torch.testing.assert_close(upstream["loss"], upstream["fused"])


# -- data --------------------------------------------------------------------------------------------------------------
def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(
        nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path
    )
    return str(path)


def test_multichannel_datalist_groups_channel_files(tmp_path):
    for name in ("a_0000", "a_0003", "b_0001", "b_0002"):
        _save(tmp_path / f"{name}.nii.gz", np.ones((4, 4, 4)))
    (tmp_path / "notes.txt").write_text("ignored")
    cases = multichannel_datalist(tmp_path, MODALITIES)
    assert [c["case"] for c in cases] == ["a", "b"]
    assert [p is not None for p in cases[0]["image"]] == [True, False, False, True]
    _save(tmp_path / "a_0004.nii.gz", np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="channel 4"):
        multichannel_datalist(tmp_path, MODALITIES)


def test_load_modalities_fills_missing_and_zero_channels_and_checks_the_grid(tmp_path):
    rng = np.random.default_rng(0)
    t1 = _save(tmp_path / "c_0000.nii.gz", rng.random((6, 5, 4)) + 1)
    t2 = _save(tmp_path / "c_0002.nii.gz", np.zeros((6, 5, 4)))
    flair = _save(tmp_path / "c_0003.nii.gz", rng.random((6, 5, 4)) + 1)
    loader = LoadModalitiesd("image", 4)
    out = loader({"image": [t1, None, t2, flair], "case": "c"})
    assert out["image"].shape == (4, 6, 5, 4)
    assert out["availability"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.all(out["image"][1:3] == 0)
    assert out["image"].meta["filename_or_obj"].endswith("c.nii.gz")
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 1.0
    moved = _save(tmp_path / "d_0001.nii.gz", rng.random((6, 5, 4)), shifted)
    with pytest.raises(ValueError, match="affine differs .* co-registered"):
        loader({"image": [t1, moved, None, None], "case": "d"})
    other = _save(tmp_path / "e_0001.nii.gz", rng.random((6, 5, 5)))
    with pytest.raises(ValueError, match="shape"):
        loader({"image": [t1, other, None, None], "case": "e"})
    with pytest.raises(ValueError, match="every channel is missing"):
        loader({"image": [None, None, t2, None], "case": "f"})
    batch = prepare_plus_batch({"image": out["image"][None], "availability": out["availability"][None]})
    assert batch[3]["availability"].shape == (1, 4) and batch[1] is None


def test_read_plus_datalist_checks_the_channel_order(tmp_path):
    files = [f"a_{k:04d}.nii.gz" for k in range(4)]
    dataset = {"channel_names": dict(enumerate(MODALITIES)), "training": [{"image": files, "label": "a.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    cases = read_plus_datalist(str(tmp_path / "dataset.json"), MODALITIES)
    assert cases[0]["image"][0] == str(tmp_path / "a_0000.nii.gz")
    with pytest.raises(ValueError, match="differ from the model's modalities"):
        read_plus_datalist(str(tmp_path / "dataset.json"), ("t1ce", "t1", "t2", "flair"))


# -- training ----------------------------------------------------------------------------------------------------------
def _cases(n: int = 5, size: int = 20, partial_last: bool = False) -> list[dict]:
    """A blob with a 3-class inner structure, visible in every channel with channel-specific contrast."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    cases = []
    for i in range(n):
        centre = rng.integers(6, size - 6, size=3)
        r2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
        label = np.select([r2 <= 2, r2 <= 6, r2 <= 14], [1, 3, 2], 0).astype(np.uint8)
        image = np.stack([rng.normal(0, 1, (size,) * 3) + (k + 1) * (label > 0) + label for k in range(4)])
        case = {"image": torch.from_numpy(image.astype(np.float32)), "label": torch.from_numpy(label[None])}
        case.update(subject=f"s{i}", availability=torch.ones(4))
        cases.append(case)
    if partial_last:
        cases[-1]["availability"] = torch.tensor([1.0, 0, 0, 1])
    return cases


def test_modality_dropout_is_deterministic_uniform_and_respects_the_case(tmp_path):
    sampler = PlusPatchSampler(_cases(1, partial_last=True), (16, 16, 16), batch_size=2, seed=3)
    drawn = [tuple(int(v) for v in sampler.sample(it, b)["availability"]) for it in range(60) for b in range(2)]
    assert set(drawn) == {(1, 0, 0, 0), (0, 0, 0, 1), (1, 0, 0, 1)}
    again = [tuple(int(v) for v in sampler.sample(it, b)["availability"]) for it in range(60) for b in range(2)]
    assert drawn == again
    sample = sampler.sample(0, 0)
    assert torch.all(sample["image"][sample["availability"] == 0] == 0), "dropped channels are zeroed"
    full = PlusPatchSampler(_cases(1), (16, 16, 16), batch_size=2, seed=3)
    counts = {}
    for it in range(300):
        pattern = tuple(int(v) for v in full.sample(it, 0)["availability"])
        counts[pattern] = counts.get(pattern, 0) + 1
    assert len(counts) == 15 and min(counts.values()) > 5


def _trainer(tmp_path: Path, model: MoMEPlus, **kwargs) -> Trainer:
    cases = _cases()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    options = {"epochs": 4, "iterations_per_epoch": 3, "batch_size": 2, "initial_lr": 0.01, "progress": False}
    options.update({"seed": 1, "foreground_fraction": 1.0, **kwargs})
    return Trainer.from_options(
        model, optimizer, cases[:-1], cases[-1:], (16, 16, 16), str(tmp_path), MODALITIES, **options
    )


def test_smoke_training_decreases_the_loss_and_logs_dice_per_pattern(tmp_path):
    trainer = _trainer(tmp_path, _plus(), epochs=5, iterations_per_epoch=4)
    history = trainer.run()
    assert history[-1]["loss"] < 0.85 * history[0]["loss"], [r["loss"] for r in history]
    assert set(history[-1]["val_dice"]) == {"t1+t1ce+t2+flair", "t1", "t1ce", "t2", "flair", "mean"}
    assert trainer._nets()[-1] is trainer.network.dispatch, "the dispatch MLP is clipped too"


def test_resume_restores_the_dispatch_network_exactly(tmp_path):
    straight = _trainer(tmp_path / "a", _plus())
    straight.run()
    _trainer(tmp_path / "b", _plus(), max_iterations=6).run()
    resumed = _trainer(tmp_path / "b", _plus(seed=9))
    resumed.run()
    for key, value in straight.network.state_dict().items():
        torch.testing.assert_close(value, resumed.network.state_dict()[key], rtol=0, atol=0, msg=key)
    assert any(k.startswith("dispatch.") for k in straight.network.state_dict())


# -- bundle ------------------------------------------------------------------------------------------------------------
def _bundle_with_tiny_plus(tmp_path: Path) -> Path:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(TEMPLATE, bundle, ignore=shutil.ignore_patterns("models", "training", "data", "__pycache__"))
    path = bundle / "configs" / "inference_plus.json"
    config = json.loads(path.read_text())
    config.update(features_per_stage=[2, 4, 8, 16], patch_size=[16, 16, 16])
    path.write_text(json.dumps(config, indent=1))
    torch.manual_seed(0)
    arch = {k: config[k] for k in SMALL}
    (bundle / "models").mkdir()
    torch.save(MoMEPlus(4, 4, **arch).state_dict(), bundle / "models" / "model_plus.pt")
    return bundle


def test_inference_plus_workflow_properties_and_template_configs():
    from monai.bundle import create_workflow

    workflow = create_workflow(
        workflow_type="inference",
        config_file=str(TEMPLATE / "configs/inference_plus.json"),
        meta_file=str(TEMPLATE / "configs/metadata.json"),
        bundle_root=str(TEMPLATE),
    )
    assert workflow.check_properties() == []
    inference = json.loads((TEMPLATE / "configs/inference_plus.json").read_text())
    train = json.loads((TEMPLATE / "configs/train_plus.json").read_text())
    for key in ("modalities", "num_classes", *SMALL, "patch_size", "spacing"):
        assert train[key] == inference[key], key
    meta = json.loads((TEMPLATE / "configs/metadata.json").read_text())["mome_plus"]["network_data_format"]
    assert list(meta["outputs"]["pred"]["channel_def"]) == ["0", "1", "2", "3"] == [str(v) for v in range(4)]
    assert meta["inputs"]["image"]["channel_def"] == {str(k): m for k, m in enumerate(MODALITIES)}


def test_bundle_runs_inference_plus_on_cases_with_missing_channels(tmp_path):
    bundle = _bundle_with_tiny_plus(tmp_path)
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name in ("a_0000", "a_0003", "b_0001"):
        _save(data / f"{name}.nii.gz", rng.random((20, 24, 18)) * 100, affine)
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    args = ["run", "--config_file", "configs/inference_plus.json", "--dataset_dir", str(data)]
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args, "--output_dir", str(tmp_path / "out")],
        cwd=bundle, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for case in ("a", "b"):
        seg = nib.load(tmp_path / "out" / f"{case}_seg.nii.gz")
        assert seg.shape == (20, 24, 18) and np.allclose(seg.affine, affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}


# -- converter ---------------------------------------------------------------------------------------------------------
PLANS = plans_v22([8, 16, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [2, 2, 2], [2, 2], [16, 16, 16])
LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}


def test_converter_reads_the_authors_momeplus_layout_and_matches_a_reference(tmp_path):
    from scripts.convert_upstream import convert

    weights = write_momeplus_checkpoint_set(tmp_path / "src", PLANS, LABELS)
    out = convert(tmp_path / "src", tmp_path / "bundle")
    assert (out / "models/model_plus.pt").is_file() and not (out / "models/model.pt").exists()
    assert not (out / "configs/train.json").exists(), "MoME-only configs are left out"
    inference = json.loads((out / "configs/inference.json").read_text())
    assert inference == json.loads((out / "configs/inference_plus.json").read_text())
    assert inference["num_classes"] == 4 and inference["modalities"] == list(MODALITIES)
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "NCR", "2": "ED",
                                                                              "3": "ET"}  # fmt: skip
    assert "mome_plus" not in meta and "checkpoint_best_dispatch.pth" in meta["upstream_checkpoints"]["sha256"]
    model = MoMEPlus(4, 4, **{k: inference[k] for k in SMALL})
    model.load_state_dict(torch.load(out / "models/model_plus.pt", weights_only=True), strict=True)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16, 16)
    c = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x, c), reference_momeplus(weights, PLANS, x, c, 4), rtol=1e-4, atol=1e-4
        )


def test_converter_rejects_a_broken_dispatch_file(tmp_path):
    from scripts.upstream import CheckpointError, read_mome_checkpoints

    write_momeplus_checkpoint_set(tmp_path / "src", PLANS, LABELS)
    torch.save({"network_weights": {"fc.weight": torch.zeros(4, 4)}}, tmp_path / "src/checkpoint_best_dispatch.pth")
    with pytest.raises(CheckpointError, match="not MoME\\+'s dispatch MLP"):
        read_mome_checkpoints(tmp_path / "src")
    (tmp_path / "src/checkpoint_best4.pth").unlink()
    with pytest.raises(CheckpointError, match="3 experts found.*MoME\\+ has 4"):
        read_mome_checkpoints(tmp_path / "src")


def test_a_mome_gate_is_not_accepted_as_a_momeplus_gate(tmp_path):
    from scripts.upstream import CheckpointError, read_mome_checkpoints

    write_momeplus_checkpoint_set(tmp_path / "src", PLANS, LABELS)
    checkpoint = torch.load(tmp_path / "src/checkpoint_best.pth", weights_only=False)
    weights = checkpoint["network_weights"]
    for key in list(weights):  # a MoME-style gate input: 1 image channel + 4 x 8 features (MoME+: 4 + 4 x 8)
        if "stages.0.0.convs.0." in key and key.endswith(("conv.weight", "all_modules.0.weight")):
            weights[key] = weights[key][:, :33].clone()
    torch.save(checkpoint, tmp_path / "src/checkpoint_best.pth")
    with pytest.raises(CheckpointError, match="not a MoME gate"):
        read_mome_checkpoints(tmp_path / "src")


# -- native studies ----------------------------------------------------------------------------------------------------
def _rigid(degrees: float, shift: tuple[float, float, float]) -> np.ndarray:
    angle = np.deg2rad(degrees)
    matrix = np.eye(4)
    matrix[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    matrix[:3, 3] = shift
    return matrix


def test_native_study_channels_are_coregistered_and_segmented_on_the_reference_grid(tmp_path):
    from scripts.pipeline import MoMEPlusSegmenter, PlusChannel
    from scripts.synthetic import generate_subject, render

    bundle = _bundle_with_tiny_plus(tmp_path)
    rng = np.random.default_rng([7, 0])
    subject = generate_subject(rng, 2.0, {"glioma": 1.0})
    moved = _rigid(8.0, (12.0, -7.0, 5.0))  # FLAIR from another session: scanner coordinates moved rigidly
    channels = {
        "t1ce": PlusChannel(render(subject, "t1ce", rng), subject.affine, "1.2.3", "AX T1 POST"),
        "t2": PlusChannel(render(subject, "t2", rng), subject.affine, "1.2.3", "AX T2"),
        "flair": PlusChannel(render(subject, "flair", rng), moved @ subject.affine, "9.9.9", "AX FLAIR"),
    }
    segmenter = MoMEPlusSegmenter(bundle, device="cpu")
    result = segmenter.segment_channels(channels, reference="t1ce")
    assert result.labels.shape == subject.label.shape and set(np.unique(result.labels)) <= {0, 1, 2, 3}
    assert result.availability == {"t1": False, "t1ce": True, "t2": True, "flair": True}
    assert result.coregistration["t2"].method == "frame of reference"
    np.testing.assert_array_equal(result.coregistration["t2"].moving_to_reference, np.eye(4))
    flair = result.coregistration["flair"]
    assert flair.method in ("rigid", "rigid via template") and not flair.warnings
    error = flair.moving_to_reference @ moved  # identity when the registration found the true motion
    corners = np.array([[x, y, z, 1.0] for x in (-60, 60) for y in (-80, 60) for z in (-40, 70)])
    assert np.abs(corners @ error.T - corners)[:, :3].max() < 2.0, "within one 2 mm voxel"
    assert result.mome_image.shape[0] == 4 and not result.mome_image[0].any(), "missing T1 is zero"
    with pytest.raises(ValueError, match="subset of"):
        segmenter.segment_channels({"dwi": channels["t2"]}, reference="dwi")


def test_zero_filled_unet_baseline_trains_with_the_same_modality_dropout(tmp_path):
    from scripts.training import build_unet

    torch.manual_seed(0)
    unet = build_unet(4, 4, **SMALL)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    cases = _cases()
    options = {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "progress": False, "modality_dropout": True}
    trainer = Trainer.from_options(
        unet, optimizer, cases[:-1], cases[-1:], (16, 16, 16), str(tmp_path), MODALITIES, **options
    )
    history = trainer.run()
    assert isinstance(trainer.sampler, PlusPatchSampler)
    assert set(history[-1]["val_dice"]) == {"t1+t1ce+t2+flair", "t1", "t1ce", "t2", "flair", "mean"}


def test_a_misaligned_series_is_left_out_not_fed_to_the_network(tmp_path):
    """FLAIR claims the reference's frame of reference but the head moved (e.g. a wrong header): low similarity after
    the identity alignment, so MoME+ runs without it and says why."""
    from scripts.pipeline import MoMEPlusSegmenter, PlusChannel
    from scripts.synthetic import generate_subject, render

    bundle = _bundle_with_tiny_plus(tmp_path)
    rng = np.random.default_rng([7, 1])
    subject = generate_subject(rng, 2.0, {"glioma": 1.0})
    moved = _rigid(10.0, (15.0, 10.0, -8.0))
    channels = {
        "t1ce": PlusChannel(render(subject, "t1ce", rng), subject.affine, "1.2.3", "AX T1 POST"),
        "flair": PlusChannel(render(subject, "flair", rng), moved @ subject.affine, "1.2.3", "AX FLAIR"),
    }
    result = MoMEPlusSegmenter(bundle, device="cpu").segment_channels(channels, reference="t1ce")
    assert result.coregistration["flair"].method == "frame of reference" and result.coregistration["flair"].warnings
    assert "low similarity" in result.excluded["flair"]
    assert result.availability == {"t1": False, "t1ce": True, "t2": False, "flair": False}
    assert not result.mome_image[3].any(), "the excluded FLAIR never reaches the network"


def test_shipped_momeplus_weights_load_into_the_template_and_respect_the_availability():
    """``models/model_plus.pt`` matches ``inference_plus.json``'s network strictly and a missing channel's content
    cannot change its output (the dispatch zeroes missing channels before anything reads them)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TEMPLATE / "configs/inference_plus.json"))
    parser["bundle_root"] = str(TEMPLATE)
    network = parser.get_parsed_content("network_def")
    state = torch.load(TEMPLATE / "models/model_plus.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    network.eval()
    x = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    noisy = x.clone()
    noisy[:, 2] = torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(1)) * 10
    with torch.inference_mode():
        first, second = network(x, availability=c), network(noisy, availability=c)
    assert first.shape == (1, 4, 32, 32, 32) and torch.isfinite(first).all()
    torch.testing.assert_close(first, second)
