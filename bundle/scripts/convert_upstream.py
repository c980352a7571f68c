"""Convert the MoME authors' checkpoint folder into a complete, runnable MONAI bundle.

Usage::

    mome-convert SRC --out BUNDLE_DIR [--sha256 NAME=HEX | --sha256 SHA256SUMS] [--torchscript]
    cd bundle && python -m scripts.convert_upstream --src SRC --out BUNDLE_DIR

``SRC`` is a folder in the authors' ``MoME_CHECKPOINT`` layout (``checkpoint_best.pth`` = gate,
``checkpoint_best1..5.pth`` = experts T1, T1ce, T2, FLAIR, DWI) or their MoME+ layout (``checkpoint_best.pth`` = gate,
``checkpoint_best1..4.pth`` = experts T1, T1ce, T2, FLAIR, ``checkpoint_best_dispatch.pth`` = dispatch MLP). The
architecture, patch size, spacing, normalisation and labels are read from the checkpoints' nnU-Net plans; the
bundle's configs are adapted to them. A MoME bundle holds ``models/model.pt`` (plain state_dict of ``network_def`` of
``configs/inference.json``); a MoME+ bundle holds ``models/model_plus.pt`` for ``configs/inference_plus.json``, which
is also written as its ``configs/inference.json`` (the MoME-only configs are left out). The bundle is assembled in a
temporary folder and moved into place only when complete, so a failed conversion leaves nothing behind.

Exit codes: 0 ok, 1 internal error, 2 usage error, 3 input rejected.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .networks import MoME, MoMEPlus
from .upstream import ArchitectureSpec, CheckpointError, UpstreamMoME, read_mome_checkpoints

__all__ = ["BUNDLE_TEMPLATE", "convert", "main", "parse_sha256_args", "write_bundle"]

logger = logging.getLogger(__name__)

BUNDLE_TEMPLATE = Path(__file__).resolve().parents[1]
_TEMPLATE_ITEMS = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/inference_native.json",
    "configs/train.json",
    "configs/train_expert.json",
    *("configs/inference_plus.json", "configs/train_plus.json"),
    "scripts",
    "resources",
    "docs",
    "LICENSE",
)
_ARCHITECTURE_CONFIGS = ("configs/inference.json", "configs/train.json", "configs/train_expert.json")
_PLUS_ARCHITECTURE_CONFIGS = ("configs/inference_plus.json", "configs/train_plus.json", "configs/train_expert.json")
_MOME_ONLY_CONFIGS = ("configs/train.json", "configs/inference_native.json")
_PLUS_DESCRIPTION = (
    "MoME+ (IEEE TMI 2025): four nnU-Net-style modality experts (T1, T1ce, T2, FLAIR), a dispatch network that fills "
    "missing modalities with soft mixes of the available ones, and a gating U-Net conditioned on the availability "
    "vector, with the authors' weights converted by mome-convert. Input is the co-registered contrasts of one subject "
    "in MoME space (any non-empty subset; missing channels absent or zero) plus the availability vector; output is a "
    "label map of the checkpoint's classes (BraTS sub-regions)."
)
# The template's metadata describes the synthetic-data demo model; converted bundles describe the authors' weights.
_UPSTREAM_METADATA = {
    "description": (
        "Mixture of Modality Experts (MoME): five nnU-Net-style modality experts and a gating U-Net that fuses their "
        "logits voxel- and class-wise at every decoder level, with the authors' weights converted by mome-convert. "
        "Input is one MRI volume in MoME space (MNI152 2009a, 1 mm, brain-masked, cropped to 160x196x160); output "
        "is a binary lesion label map."
    ),
    "data_source": (
        "Authors' training data: BraTS 2021, ATLAS v2.0, ISLES 2022, WMH 2017, MSSEG 2016, OASIS (6,585 annotated "
        "images in total across the nine datasets of the paper)"
    ),
    "image_classes": (
        "one MRI channel (T1, T1ce, T2, FLAIR or DWI) in MNI152 2009a space at the checkpoint's spacing, z-scored "
        "over the whole cropped volume"
    ),
    "eval_metrics": {"mean_dice": 0.0},
}
_PLUS_METADATA = {
    "task": "Brain tumour sub-region segmentation from any subset of T1, T1ce, T2 and FLAIR with one model (MoME+)",
    "description": _PLUS_DESCRIPTION,
    "data_source": "Authors' training data for MoME+: BraTS 2021",
    "image_classes": (
        "T1, T1ce, T2, FLAIR channels in this order, co-registered in MNI152 2009a space at the checkpoint's spacing, "
        "each z-scored; missing channels zero, with the availability vector"
    ),
}
_LESION_SYNONYMS = {"abnormal", "abnormality", "lesion", "lesions"}
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


def parse_sha256_args(values: Sequence[str]) -> dict[str, str]:
    """``NAME=HEX`` items and/or paths of ``sha256sum``-style files -> ``{file name: hex}``.

    Raises:
        CheckpointError: a malformed item or an unreadable sums file.
    """
    expected: dict[str, str] = {}
    for value in values:
        if "=" in value:
            name, digest = value.split("=", 1)
            pairs = [(digest.strip(), name.strip())]
        else:
            path = Path(value)
            if not path.is_file():
                raise CheckpointError(f"--sha256 {value}: neither NAME=HEX nor a readable checksum file.")
            pairs = [tuple(line.split(None, 1)) for line in path.read_text().splitlines() if line.strip()]
        for pair in pairs:
            if len(pair) != 2 or len(pair[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in pair[0]):
                raise CheckpointError(f"--sha256 {value}: malformed entry {' '.join(pair)!r}; expected a 64-digit hex.")
            expected[Path(pair[1].strip().lstrip("*")).name] = pair[0].lower()
    return expected


def _channel_def(labels: Mapping[str, int]) -> dict[str, str]:
    """Label value -> name; the authors' binary foreground ("abnormal") is our "lesion"."""
    names = {str(value): name for name, value in labels.items()}
    if len(names) == 2 and names["1"].lower() in _LESION_SYNONYMS:
        names["1"] = "lesion"
    return names


def _adapt_inference_config(config: dict[str, Any], spec: ArchitectureSpec, modalities: Sequence[str]) -> None:
    if "in_channels" in config:  # MoME configs; MoME+ experts take one dispatched channel each
        config["in_channels"] = spec.in_channels
    config.update(
        {
            "modalities": list(modalities),
            "num_classes": spec.num_classes,
            "features_per_stage": spec.features_per_stage,
            "kernel_sizes": spec.kernel_sizes,
            "strides": spec.strides,
            "n_conv_per_stage": spec.n_conv_per_stage,
            "n_conv_per_stage_decoder": spec.n_conv_per_stage_decoder,
            "patch_size": spec.patch_size,
            "spacing": spec.spacing,
            "mirror_axes": spec.mirror_axes,
            "normalize_nonzero": spec.use_mask_for_norm,
        }
    )
    if "modality_classifier" in config:  # our extension; the authors' MoME has none
        config["modality_classifier"] = False


def _adapt_metadata(meta: dict[str, Any], upstream: UpstreamMoME, src: Path, divisor: Sequence[int]) -> None:
    spec = upstream.spec
    meta.update(_UPSTREAM_METADATA)
    meta.pop("demo_model", None)
    plus = meta.pop("mome_plus", None)
    if upstream.is_plus:
        meta.update(_PLUS_METADATA)
        meta["network_data_format"] = plus["network_data_format"]
    # twice the divisor: a 1-voxel bottleneck cannot be instance-normalised
    shape = [f"{2 * d}*n" for d in divisor]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    channels = len(upstream.modalities) if upstream.is_plus else spec.in_channels
    image.update({"num_channels": channels, "spatial_shape": shape})
    if upstream.is_plus:
        image["channel_def"] = {str(k): name for k, name in enumerate(upstream.modalities)}
    pred.update({"num_channels": spec.num_classes, "spatial_shape": shape, "channel_def": _channel_def(spec.labels)})
    labels = ", ".join(f"{value} {name}" for value, name in pred["channel_def"].items())
    meta["label_classes"] = meta["pred_classes"] = f"single-channel label map: {labels}"
    meta["upstream_checkpoints"] = {
        "source_folder": src.name,
        "sha256": upstream.sha256,
        "modalities": upstream.modalities,
        "nnunet_dataset": spec.dataset_name,
        "nnunet_plans": spec.plans_name,
        "nnunet_labels": spec.labels,
        **{key: value for key, value in upstream.trainer_info.items() if value is not None},
    }


def build_network(upstream: UpstreamMoME) -> MoME:
    """Instantiates :class:`MoME` / :class:`MoMEPlus` for the checkpoint set and loads its weights after an explicit
    shape check."""
    spec = upstream.spec
    if upstream.is_plus:
        network: MoME = MoMEPlus(len(upstream.modalities), spec.num_classes, **spec.topology())
    else:
        network = MoME(len(upstream.modalities), spec.in_channels, spec.num_classes, **spec.topology())
    expected = network.state_dict()
    missing = sorted(set(expected) - set(upstream.state_dict))
    unexpected = sorted(set(upstream.state_dict) - set(expected))
    wrong = [
        f"{key}: checkpoint {tuple(tensor.shape)} vs plans {tuple(expected[key].shape)}"
        for key, tensor in upstream.state_dict.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            "checkpoint weights do not match the architecture in their own plans: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})."
        )
    network.load_state_dict(upstream.state_dict, strict=True)
    return network.eval()


def write_bundle(upstream: UpstreamMoME, network: MoME, out: Path, src: Path, torchscript: bool = False) -> None:
    """Writes the complete bundle (template files, adapted configs, weights) into the empty folder ``out``."""
    for item in _TEMPLATE_ITEMS:
        source, target = BUNDLE_TEMPLATE / item, out / item
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for name in _PLUS_ARCHITECTURE_CONFIGS if upstream.is_plus else _ARCHITECTURE_CONFIGS:
        config_path = out / name
        config = json.loads(config_path.read_text())
        _adapt_inference_config(config, upstream.spec, upstream.modalities)
        config_path.write_text(json.dumps(config, indent=4) + "\n")
    meta_path = out / "configs/metadata.json"
    meta = json.loads(meta_path.read_text())
    _adapt_metadata(meta, upstream, src, network.size_divisor)
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    (out / "models").mkdir(exist_ok=True)
    if upstream.is_plus:
        for name in _MOME_ONLY_CONFIGS:
            (out / name).unlink()
        shutil.copy2(out / "configs/inference_plus.json", out / "configs/inference.json")
        torch.save(network.state_dict(), out / "models/model_plus.pt")
        if torchscript:
            raise CheckpointError(
                "--torchscript is not supported for MoME+ (its forward takes an availability vector)."
            )
        return
    torch.save(network.state_dict(), out / "models/model.pt")
    if torchscript:
        _export_torchscript(out)


def _export_torchscript(bundle: Path) -> None:
    """``models/model.ts`` (with the configs embedded) through MONAI's ``ckpt_export``."""
    from monai.bundle import ckpt_export

    sys.path.insert(0, str(bundle))
    try:
        ckpt_export(
            net_id="network_def",
            filepath=str(bundle / "models/model.ts"),
            ckpt_file=str(bundle / "models/model.pt"),
            meta_file=str(bundle / "configs/metadata.json"),
            config_file=str(bundle / "configs/inference.json"),
            bundle_root=str(bundle),
        )
    finally:
        sys.path.remove(str(bundle))


def convert(
    src: Path,
    out: Path,
    expected_sha256: Mapping[str, str] | None = None,
    modalities: Sequence[str] | None = None,
    torchscript: bool = False,
    force: bool = False,
) -> Path:
    """Converts the authors' checkpoint folder ``src`` into a runnable bundle at ``out``.

    Raises:
        CheckpointError: bad input (missing files, wrong layout, not MoME, shape mismatch, untrusted pickle,
            checksum mismatch) or an existing non-empty ``out`` without ``force``.
    """
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out}: exists and is not empty; choose another --out or pass --force.")
    if out.resolve() == BUNDLE_TEMPLATE or BUNDLE_TEMPLATE in out.resolve().parents:
        raise CheckpointError(f"{out}: would overwrite the bundle template itself; choose another --out.")
    upstream = read_mome_checkpoints(src, expected_sha256, modalities)
    network = build_network(upstream)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_bundle(upstream, network, staging, src, torchscript)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote MoME bundle to %s", out)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mome-convert",
        description=(
            "Convert the MoME authors' checkpoint folder (MoME_CHECKPOINT layout, MoME or MoME+) into a MONAI bundle."
        ),
    )
    parser.add_argument(
        "src",
        nargs="?",
        type=Path,
        help="folder with checkpoint_best.pth and checkpoint_best1..5.pth (MoME) or checkpoint_best1..4.pth and "
        "checkpoint_best_dispatch.pth (MoME+)",
    )
    parser.add_argument("--src", dest="src_option", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", "-o", required=True, type=Path, help="bundle folder to create")
    parser.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="NAME=HEX|SUMS_FILE",
        help="verify checkpoint files before loading (repeatable; or a sha256sum-format file)",
    )
    parser.add_argument(
        "--modalities", help="comma-separated expert names (default t1,t1ce,t2,flair,dwi; MoME+ t1,t1ce,t2,flair)"
    )
    parser.add_argument("--torchscript", action="store_true", help="also write models/model.ts (ckpt_export)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    src = args.src or args.src_option
    if src is None or (args.src and args.src_option):
        parser.error("give the checkpoint folder once, as SRC or --src SRC.")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    modalities = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    try:
        expected = parse_sha256_args(args.sha256)
        out = convert(src, args.out, expected, modalities, args.torchscript, args.force)
    except CheckpointError as err:
        print(f"mome-convert: input rejected: {err}", file=sys.stderr)
        return EXIT_REJECTED
    except Exception as err:  # noqa: BLE001 - report, never a traceback-only failure
        logger.exception("internal error")
        print(f"mome-convert: internal error: {err}", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"wrote MoME bundle: {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
