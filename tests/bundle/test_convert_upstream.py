"""mome-convert: complete bundle from the authors' layout; every rejection path has its message and exit code."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.convert_upstream import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from scripts.upstream import CheckpointError, UntrustedCheckpointError, load_checkpoint, read_mome_checkpoints

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def src_copy(tmp_path: Path, upstream_dir: Path) -> Path:
    """A writable copy of the upstream checkpoint folder."""
    folder = tmp_path / "MoME_CHECKPOINT"
    folder.mkdir()
    for path in upstream_dir.glob("checkpoint_best*.pth"):
        shutil.copy(path, folder / path.name)
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_converted_bundle_is_complete_and_adapted(converted_bundle: Path, upstream_dir: Path):
    for item in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/inference_native.json",
        "models/model.pt",
        "models/model.ts",
        "scripts/networks.py",
        "docs/README.md",
        "LICENSE",
    ):
        assert (converted_bundle / item).is_file(), item
    inference = json.loads((converted_bundle / "configs/inference.json").read_text())
    assert inference["patch_size"] == [32, 32, 32]
    assert inference["features_per_stage"] == [32, 32, 32, 32]
    assert inference["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert inference["modalities"] == ["t1", "t1ce", "t2", "flair", "dwi"]
    for name in ("train.json", "train_expert.json"):  # fine-tuning starts from the converted architecture
        train = json.loads((converted_bundle / "configs" / name).read_text())
        for key in ("features_per_stage", "kernel_sizes", "strides", "patch_size", "spacing", "n_conv_per_stage"):
            assert train[key] == inference[key], (name, key)
    assert (converted_bundle / "resources/mni152_2009a/t1.nii.gz").is_file()
    meta = json.loads((converted_bundle / "configs/metadata.json").read_text())
    assert "synthetic" not in meta["description"].lower() and "demo_model" not in meta
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "lesion"}
    assert pred["spatial_shape"] == ["16*n"] * 3
    gate_sha = hashlib.sha256((upstream_dir / "checkpoint_best.pth").read_bytes()).hexdigest()
    assert meta["upstream_checkpoints"]["sha256"]["checkpoint_best.pth"] == gate_sha
    assert meta["upstream_checkpoints"]["nnunet_labels"] == {"background": 0, "abnormal": 1}
    state = torch.load(converted_bundle / "models/model.pt", weights_only=True)
    assert not any("all_modules" in key or "decoder.encoder" in key for key in state)
    assert len([key for key in state if key.startswith("gate.")]) == len(state) // 6


def test_alias_keys_are_dropped_and_weights_mapped(upstream_dir: Path):
    upstream = read_mome_checkpoints(upstream_dir)
    raw = load_checkpoint(upstream_dir / "checkpoint_best3.pth")["network_weights"]
    torch.testing.assert_close(
        upstream.state_dict["experts.2.decoder.1.0.norm.bias"], raw["decoder.stages.1.convs.0.norm.bias"]
    )
    torch.testing.assert_close(
        upstream.state_dict["gate.heads.2.weight"],
        load_checkpoint(upstream_dir / "checkpoint_best.pth")["network_weights"]["decoder.seg_layers.2.weight"],
    )


def test_cli_success_and_sha256_verification(tmp_path, capsys, upstream_dir):
    digest = hashlib.sha256((upstream_dir / "checkpoint_best2.pth").read_bytes()).hexdigest()
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{digest}  MoME_CHECKPOINT/checkpoint_best2.pth\n")
    code, text = run_cli(capsys, upstream_dir, "--out", tmp_path / "b", "--sha256", sums)
    assert code == EXIT_OK and "wrote MoME bundle" in text
    assert (tmp_path / "b/models/model.pt").is_file()


def test_console_script_and_module_forms(tmp_path):
    exe = Path(sys.executable).parent / "mome-convert"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "MoME_CHECKPOINT" in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.convert_upstream",
            "--src",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO / "bundle",
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_REJECTED and "not a directory" in result.stderr


def expect_rejection(capsys, tmp_path, src, match, *extra):
    out = tmp_path / "out_bundle"
    code, text = run_cli(capsys, src, "--out", out, *extra)
    assert code == EXIT_REJECTED, text
    assert "input rejected" in text and match in text, text
    assert not out.exists(), "a rejected conversion must not leave output"
    assert not list(tmp_path.glob(".out_bundle.*")), "staging folder left behind"


def test_missing_folder(tmp_path, capsys):
    expect_rejection(capsys, tmp_path, tmp_path / "nope", "not a directory")


def test_missing_gate_file(tmp_path, capsys, src_copy):
    (src_copy / "checkpoint_best.pth").unlink()
    expect_rejection(capsys, tmp_path, src_copy, "checkpoint_best.pth (the gate) is missing")


def test_missing_expert_file_breaks_the_sequence(tmp_path, capsys, src_copy):
    (src_copy / "checkpoint_best3.pth").unlink()
    expect_rejection(capsys, tmp_path, src_copy, "not consecutive")


def test_momeplus_layout_is_recognised(tmp_path, capsys, src_copy):
    """A dispatch file makes it a MoME+ set, which has 4 experts, not MoME's 5 (see test_momeplus.py for MoME+)."""
    shutil.copy(src_copy / "checkpoint_best1.pth", src_copy / "checkpoint_best_dispatch.pth")
    expect_rejection(capsys, tmp_path, src_copy, "5 experts found; name them with --modalities (MoME+ has 4)")


def test_expert_in_place_of_the_gate_is_not_mome(tmp_path, capsys, src_copy):
    shutil.copy(src_copy / "checkpoint_best1.pth", src_copy / "checkpoint_best.pth")
    expect_rejection(capsys, tmp_path, src_copy, "not a MoME gate")


def test_plain_state_dict_is_not_an_nnunet_checkpoint(tmp_path, capsys, src_copy):
    torch.save({"conv.weight": torch.zeros(1)}, src_copy / "checkpoint_best4.pth")
    expect_rejection(capsys, tmp_path, src_copy, "not an nnU-Net training checkpoint")


def test_garbage_file(tmp_path, capsys, src_copy):
    (src_copy / "checkpoint_best5.pth").write_bytes(b"not a checkpoint")
    expect_rejection(capsys, tmp_path, src_copy, "not a readable PyTorch checkpoint")


def test_shape_mismatch(tmp_path, capsys, src_copy):
    path = src_copy / "checkpoint_best2.pth"
    checkpoint = load_checkpoint(path)
    key = "decoder.transpconvs.1.weight"
    checkpoint["network_weights"][key] = torch.zeros(32, 16, 2, 2, 2)
    torch.save(checkpoint, path)
    expect_rejection(capsys, tmp_path, src_copy, "shape mismatches")


def test_inconsistent_alias_is_detected(tmp_path, capsys, src_copy):
    path = src_copy / "checkpoint_best1.pth"
    checkpoint = load_checkpoint(path)
    checkpoint["network_weights"]["encoder.stages.0.0.convs.0.all_modules.1.bias"] = torch.ones(32)
    torch.save(checkpoint, path)
    expect_rejection(capsys, tmp_path, src_copy, "does not match its canonical tensor")


class _Payload:
    """Unpickling this would create a file; a safe loader must refuse before that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_untrusted_pickle_is_refused_without_executing_it(tmp_path, capsys, src_copy):
    marker = tmp_path / "pwned"
    path = src_copy / "checkpoint_best1.pth"
    checkpoint = load_checkpoint(path)
    checkpoint["logging"] = _Payload(str(marker))
    torch.save(checkpoint, path)
    expect_rejection(capsys, tmp_path, src_copy, "refused to unpickle the global getattr")
    assert not marker.exists()
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(path)


def test_sha256_mismatch_is_checked_before_loading(tmp_path, capsys, upstream_dir):
    expect_rejection(capsys, tmp_path, upstream_dir, "SHA-256 mismatch", "--sha256", "checkpoint_best.pth=" + "0" * 64)


def test_malformed_sha256_argument(tmp_path, capsys, upstream_dir):
    expect_rejection(capsys, tmp_path, upstream_dir, "malformed entry", "--sha256", "checkpoint_best.pth=abc")


def test_existing_output_is_not_overwritten_without_force(tmp_path, capsys, upstream_dir):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, text = run_cli(capsys, upstream_dir, "--out", out)
    assert code == EXIT_REJECTED and "--force" in text
    assert (out / "keep.txt").read_text() == "user data"


def test_wrong_number_of_modality_names(tmp_path, capsys, upstream_dir):
    expect_rejection(capsys, tmp_path, upstream_dir, "5 experts but 2 modality names", "--modalities", "t1,t2")


def test_usage_errors_exit_2(capsys, upstream_dir):
    with pytest.raises(SystemExit) as raised:
        main([str(upstream_dir)])
    assert raised.value.code == EXIT_USAGE
    assert "--out" in capsys.readouterr().err


def test_checkpoint_error_type_for_library_users(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "missing.pth")
