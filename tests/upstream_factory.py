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


def random_upstream_unet(in_ch, out_ch, features, kernels, strides, n_enc, n_dec, gen, prior=0) -> OrderedDict:
    """A random state_dict with nnU-Net's exact keys, including the alias keys it saves.

    ``prior`` > 0 widens the first transposed conv by the prior channels (MoME+'s gate: 320 + 4 = 324 inputs)."""
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
        below, feats = features[skip + 1] + (prior if d == 0 else 0), features[skip]
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
        checkpoint = _nnunet_checkpoint(sd, plans, labels)
        name = "checkpoint_best.pth" if index == 0 else f"checkpoint_best{index}.pth"
        torch.save(checkpoint, folder / name)
        weights[name] = sd
    return weights


def _nnunet_checkpoint(weights: OrderedDict, plans: dict, labels: dict) -> dict:
    """An nnU-Net v2 training checkpoint around ``weights``, with the keys and pickled types the authors' files have."""
    return {
        "network_weights": weights,
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


def reference_unet(sd, x, arch, prior=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(stage-0 features, full-resolution logits) of nnU-Net's PlainConvUNet, straight from upstream keys.

    ``prior`` ``(B, P)`` is appended as constant maps to the bottleneck (MoME+'s ``Mod_Prior``)."""
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
    if prior is not None:
        maps = prior[:, :, None, None, None] * torch.ones((1, 1, *x.shape[2:]))
        x = torch.cat([x, maps], 1)
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


def _dispatch_weights(m: int, gen: torch.Generator) -> OrderedDict:
    sizes = [(m, m), (2 * m, m), (m * m, 2 * m), (m * m, m * m)]
    sd: OrderedDict = OrderedDict()
    for layer, (out_f, in_f) in zip((0, 2, 4, 6), sizes):
        sd[f"mlp.{layer}.weight"] = torch.randn(out_f, in_f, generator=gen) * 0.8
        sd[f"mlp.{layer}.bias"] = torch.randn(out_f, generator=gen) * 0.3
    return sd


def write_momeplus_checkpoint_set(
    folder: Path, plans: dict, labels: dict, n_modalities: int = 4, seed: int = 0
) -> dict:
    """MoME+ layout: gate ``checkpoint_best.pth`` (M + M*F0 inputs, prior M at the bottleneck, M*C outputs),
    experts ``checkpoint_best1..M.pth`` (1 -> C) and ``checkpoint_best_dispatch.pth`` holding only
    ``network_weights`` and ``inference_allowed_mirroring_axes``; returns the weights by file name."""
    arch = _arch(plans)
    n_classes = len(labels)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for index in range(n_modalities + 1):
        gate = index == 0
        sd = random_upstream_unet(
            n_modalities + n_modalities * arch["features"][0] if gate else 1,
            n_modalities * n_classes if gate else n_classes,
            arch["features"], arch["kernels"], arch["strides"], arch["n_enc"], arch["n_dec"], gen,
            prior=n_modalities if gate else 0,
        )  # fmt: skip
        checkpoint = _nnunet_checkpoint(sd, plans, labels)
        name = "checkpoint_best.pth" if gate else f"checkpoint_best{index}.pth"
        torch.save(checkpoint, folder / name)
        weights[name] = sd
    dispatch = _dispatch_weights(n_modalities, gen)
    torch.save(
        {"network_weights": dispatch, "inference_allowed_mirroring_axes": (0, 1, 2)},
        folder / "checkpoint_best_dispatch.pth",
    )
    weights["checkpoint_best_dispatch.pth"] = dispatch
    return weights


def reference_dispatch(sd: dict, c: torch.Tensor) -> torch.Tensor:
    """``D*`` computed the way the authors' trainer does, row by row (independent of ``scripts.networks``)."""
    h = c.float()
    for layer in (0, 2, 4):
        h = F.relu(F.linear(h, sd[f"mlp.{layer}.weight"], sd[f"mlp.{layer}.bias"]))
    m = c.shape[1]
    raw = F.linear(h, sd["mlp.6.weight"], sd["mlp.6.bias"]).reshape(-1, m, m)
    out = torch.zeros_like(raw)
    for b in range(raw.shape[0]):
        for i in range(m):
            row = raw[b, i]
            row = (row - row.min() + 1e-4) / (row.max() - row.min() + 1e-4)
            row = row * c[b].float()
            if c[b, i] == 1:
                row = torch.zeros(m)
                row[i] = 1.0
            out[b, i] = row
    return out


def reference_momeplus(weights: dict, plans: dict, x: torch.Tensor, c: torch.Tensor, n_classes: int) -> torch.Tensor:
    """MoME+ fused logits from upstream-format weights: dispatch, 4 experts on S[:, k], prior-conditioned gate."""
    arch = _arch(plans)
    m = x.shape[1]
    d = reference_dispatch(weights["checkpoint_best_dispatch.pth"], c)
    s = torch.einsum("bij,bjxyz->bixyz", d, x)
    features, logits = [s], []
    for k in range(m):
        f0, e = reference_unet(weights[f"checkpoint_best{k + 1}.pth"], s[:, k : k + 1], arch)
        features.append(f0)
        logits.append(e)
    _, gate = reference_unet(weights["checkpoint_best.pth"], torch.cat(features, 1), arch, prior=c.float())
    return sum(logits[k] * gate[:, n_classes * k : n_classes * (k + 1)] for k in range(m))
