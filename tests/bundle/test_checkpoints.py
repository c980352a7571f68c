"""Moving experts between a MoME checkpoint and single-expert checkpoints (``scripts.checkpoints``), as the weights
recipe does (``bench/recipes/demo_weights.sh``)."""

from __future__ import annotations

import pytest
import torch

from scripts.checkpoints import extract_experts, main, replace_experts
from scripts.networks import MODALITIES, MoME

SMALL = {
    "features_per_stage": [4, 8],
    "kernel_sizes": [3, 3],
    "strides": [1, 2],
    "n_conv_per_stage": [1, 1],
    "n_conv_per_stage_decoder": [1],
}


def _mome(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return MoME(num_experts=len(MODALITIES), in_channels=1, num_classes=2, **SMALL).state_dict()


def test_an_extracted_expert_put_back_into_another_checkpoint_replaces_exactly_its_tensors(tmp_path):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    torch.save(_mome(0), first)
    torch.save(_mome(1), second)
    paths = extract_experts(first, ["t2"], tmp_path / "experts")
    assert set(paths) == {"t2"} and paths["t2"].is_file()
    out = replace_experts(second, {"t2": paths["t2"]}, tmp_path / "assembled.pt")
    assembled, a, b = (torch.load(p, weights_only=True) for p in (out, first, second))
    t2 = f"experts.{MODALITIES.index('t2')}."
    assert any(key.startswith(t2) for key in assembled)
    for key, value in assembled.items():
        torch.testing.assert_close(value, (a if key.startswith(t2) else b)[key])


def test_an_expert_of_another_shape_is_refused_naming_its_modality(tmp_path):
    torch.save(_mome(0), tmp_path / "start.pt")
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(KeyError, match="dwi"):
        replace_experts(tmp_path / "start.pt", {"dwi": tmp_path / "wrong.pt"}, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_the_command_line_extracts_and_replaces(tmp_path):
    torch.save(_mome(0), tmp_path / "start.pt")
    assert main(["extract", str(tmp_path / "start.pt"), str(tmp_path / "e"), "t1", "flair"]) == 0
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["flair.pt", "t1.pt"]
    pairs = [f"t1={tmp_path / 'e' / 't1.pt'}", f"flair={tmp_path / 'e' / 'flair.pt'}"]
    assert main(["replace", str(tmp_path / "start.pt"), str(tmp_path / "back.pt"), *pairs]) == 0
    back, start = (torch.load(tmp_path / n, weights_only=True) for n in ("back.pt", "start.pt"))
    assert all(torch.equal(back[k], start[k]) for k in start)
    assert main(["replace", str(tmp_path / "start.pt"), str(tmp_path / "x.pt"), "t1"]) != 0  # no =PATH
