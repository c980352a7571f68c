"""Shared fixtures: the bundle's ``scripts`` package on sys.path, the upstream fixture and a converted bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from operators.bundle import use_bundle_scripts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BUNDLE = use_bundle_scripts(REPO / "bundle")
UPSTREAM_TINY = DATA / "upstream_mome_tiny"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    """The authors'-format checkpoint set (random weights, tiny plans) with reference outputs of their code."""
    return UPSTREAM_TINY


@pytest.fixture(scope="session")
def reference_outputs(upstream_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(upstream_dir / "reference_outputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def converted_bundle(tmp_path_factory: pytest.TempPathFactory, upstream_dir: Path) -> Path:
    """The upstream fixture converted into a bundle (with TorchScript export) once per session."""
    from scripts.convert_upstream import convert

    return convert(upstream_dir, tmp_path_factory.mktemp("bundles") / "mome_tiny", torchscript=True)


@pytest.fixture(scope="session")
def converted_network(converted_bundle: Path):
    """``network_def`` of the converted bundle with its weights, in eval mode."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(converted_bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(converted_bundle)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(converted_bundle / "models" / "model.pt", weights_only=True), strict=True)
    return network.eval()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The template bundle with a tiny MoME (features 2-16, 4 mm MoME space, 32^3 tiles) and random weights."""
    bundle = tmp_path_factory.mktemp("bundle") / "mome"
    ignore = shutil.ignore_patterns("models", "training", "data", "__pycache__")
    shutil.copytree(REPO / "bundle", bundle, ignore=ignore)
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config.update(features_per_stage=[2, 4, 8, 16], spacing=[4.0, 4.0, 4.0], patch_size=[32, 32, 32])
    config_path.write_text(json.dumps(config, indent=1))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_path))
    torch.manual_seed(0)
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle
