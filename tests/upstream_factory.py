"""Builds checkpoint sets in the MoME authors' on-disk format for arbitrary nnU-Net plans, and an independent
functional reference of nnU-Net's PlainConvUNet forward that reads the authors' key names directly.

Used to show that conversion and inference are plan-agnostic (stage counts, widths, anisotropic kernels and strides,
non-cubic patches, other expert/class counts) without the authors' code at hand.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def plans_v22(features, kernels, strides, n_enc, n_dec, patch, base=None, cap=None) -> dict:
    """nnU-Net <= 2.3 style plans (UNet_base_num_features / pool_op_kernel_sizes ...)."""
    base = base or features[0]
    cap = cap or max(features)
    assert [min(base * 2**i, cap) for i in range(len(features))] == list(features)
    config = {
        "patch_size": list(patch),
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": base,
        "unet_max_num_features": cap,
        "conv_kernel_sizes": [list(k) for k in kernels],
        "pool_op_kernel_sizes": [list(s) for s in strides],
        "n_conv_per_stage_encoder": list(n_enc),
        "n_conv_per_stage_decoder": list(n_dec),
    }
    return {
        "dataset_name": "DatasetXXX_Test",
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
    }


def plans_v24(features, kernels, strides, n_enc, n_dec, patch) -> dict:
    """nnU-Net >= 2.4 style plans (``architecture.arch_kwargs``), reached through ``inherits_from``."""
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": len(features),
            "features_per_stage": list(features),
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": list(n_enc),
            "n_conv_per_stage_decoder": list(n_dec),
            "conv_bias": True,
        },
    }
    base = {
        "patch_size": list(patch),
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "architecture": arch,
    }
    return {
        "dataset_name": "DatasetXXX_Test",
        "plans_name": "nnUNetResEncPlans",
        "transpose_forward": [0, 1, 2],
        "configurations": {"base": base, "3d_fullres": {"inherits_from": "base"}},
    }


def _conv_block(sd, prefix, cin, cout, kernel, gen, alias_prefixes=()):
    tensors = {
        "conv.weight": torch.randn(cout, cin, *kernel, generator=gen) * (2.0 / (cin * np.prod(kernel))) ** 0.5,
        "conv.bias": torch.randn(cout, generator=gen) * 0.1,
        "norm.weight": 1 + torch.randn(cout, generator=gen) * 0.1,
        "norm.bias": torch.randn(cout, generator=gen) * 0.1,
    }
    for name, tensor in tensors.items():
        sd[prefix + name] = tensor
        alias = name.replace("conv.", "all_modules.0.").replace("norm.", "all_modules.1.")
        sd[prefix + alias] = tensor
        for extra in alias_prefixes:
            sd[extra + prefix + name] = tensor
            sd[extra + prefix + alias] = tensor


def random_upstream_unet(in_ch, out_ch, features, kernels, strides, n_enc, n_dec, gen) -> OrderedDict:
    """A random state_dict with nnU-Net's exact keys, including the alias keys it saves."""
    sd: OrderedDict = OrderedDict()
    cin = in_ch
    for s, feats in enumerate(features):
        for j in range(n_enc[s]):
            _conv_block(
                sd,
                f"encoder.stages.{s}.0.convs.{j}.",
                cin if j == 0 else feats,
                feats,
                kernels[s],
                gen,
                alias_prefixes=("decoder.",),
            )
        cin = feats
    n = len(features)
    for d in range(n - 1):
        skip = n - 2 - d
        below, feats = features[skip + 1], features[skip]
        sd[f"decoder.transpconvs.{d}.weight"] = torch.randn(below, feats, *strides[skip + 1], generator=gen) * 0.2
        sd[f"decoder.transpconvs.{d}.bias"] = torch.randn(feats, generator=gen) * 0.1
        for j in range(n_dec[d]):
            _conv_block(sd, f"decoder.stages.{d}.convs.{j}.", 2 * feats if j == 0 else feats, feats, kernels[skip], gen)
        sd[f"decoder.seg_layers.{d}.weight"] = torch.randn(out_ch, feats, 1, 1, 1, generator=gen) * 0.3
        sd[f"decoder.seg_layers.{d}.bias"] = torch.randn(out_ch, generator=gen) * 0.1
    return sd


def write_checkpoint_set(folder: Path, plans: dict, labels: dict, n_experts: int, seed: int = 0) -> dict:
    """Writes ``checkpoint_best.pth`` + ``checkpoint_best1..K.pth`` like the authors' trainer; returns the weights."""
    arch = _arch(plans)
    n_classes = len(labels)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for index in range(n_experts + 1):
        in_ch = 1 + n_experts * arch["features"][0] if index == 0 else 1
        out_ch = n_experts * n_classes if index == 0 else n_classes
        sd = random_upstream_unet(
            in_ch, out_ch, arch["features"], arch["kernels"], arch["strides"], arch["n_enc"], arch["n_dec"], gen
        )
        checkpoint = {
            "network_weights": sd,
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3, "momentum": 0.99, "nesterov": True}]},
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [0.1], "ema_fg_dice": [0.1]},
            "_best_ema": np.float64(0.1),
            "current_epoch": 1,
            "init_args": {
                "plans": plans,
                "configuration": "3d_fullres",
                "fold": "MoME",
                "dataset_json": {"channel_names": {"0": "MRI"}, "labels": labels},
                "unpack_dataset": True,
                "device": torch.device("cpu"),
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        name = "checkpoint_best.pth" if index == 0 else f"checkpoint_best{index}.pth"
        torch.save(checkpoint, folder / name)
        weights[name] = sd
    return weights


def _arch(plans: dict) -> dict:
    config = plans["configurations"]["3d_fullres"]
    if "inherits_from" in config:
        config = {**plans["configurations"][config["inherits_from"]], **config}
    if "architecture" in config:
        kw = config["architecture"]["arch_kwargs"]
        return {
            "features": kw["features_per_stage"],
            "kernels": kw["kernel_sizes"],
            "strides": kw["strides"],
            "n_enc": kw["n_conv_per_stage"],
            "n_dec": kw["n_conv_per_stage_decoder"],
        }
    n = len(config["conv_kernel_sizes"])
    features = [min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(n)]
    return {
        "features": features,
        "kernels": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        "n_enc": config["n_conv_per_stage_encoder"],
        "n_dec": config["n_conv_per_stage_decoder"],
    }


def _block(sd, prefix, x, kernel, stride=(1, 1, 1)):
    pad = tuple((k - 1) // 2 for k in kernel)
    x = F.conv3d(x, sd[prefix + "conv.weight"], sd[prefix + "conv.bias"], stride=tuple(stride), padding=pad)
    x = F.instance_norm(x, weight=sd[prefix + "norm.weight"], bias=sd[prefix + "norm.bias"], eps=1e-5)
    return F.leaky_relu(x, 0.01)


def reference_unet(sd, x, arch) -> tuple[torch.Tensor, torch.Tensor]:
    """(stage-0 features, full-resolution logits) of nnU-Net's PlainConvUNet, straight from upstream keys."""
    skips = []
    n = len(arch["features"])
    for s in range(n):
        for j in range(arch["n_enc"][s]):
            x = _block(
                sd,
                f"encoder.stages.{s}.0.convs.{j}.",
                x,
                arch["kernels"][s],
                arch["strides"][s] if j == 0 else (1, 1, 1),
            )
        skips.append(x)
    for d in range(n - 1):
        skip = n - 2 - d
        up = F.conv_transpose3d(
            x,
            sd[f"decoder.transpconvs.{d}.weight"],
            sd[f"decoder.transpconvs.{d}.bias"],
            stride=tuple(arch["strides"][skip + 1]),
        )
        x = torch.cat([up, skips[skip]], 1)
        for j in range(arch["n_dec"][d]):
            x = _block(sd, f"decoder.stages.{d}.convs.{j}.", x, arch["kernels"][skip])
    head = n - 2
    logits = F.conv3d(x, sd[f"decoder.seg_layers.{head}.weight"], sd[f"decoder.seg_layers.{head}.bias"])
    return skips[0], logits


def reference_mome(weights: dict, plans: dict, x: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Fused logits ``sum_k E_k * W[:, C*k : C*(k+1)]`` computed from the upstream-format weights."""
    arch = _arch(plans)
    n_experts = len(weights) - 1
    features, logits = [x], []
    for k in range(1, n_experts + 1):
        f0, e = reference_unet(weights[f"checkpoint_best{k}.pth"], x, arch)
        features.append(f0)
        logits.append(e)
    _, gate = reference_unet(weights["checkpoint_best.pth"], torch.cat(features, 1), arch)
    return sum(logits[k] * gate[:, n_classes * k : n_classes * (k + 1)] for k in range(n_experts))
