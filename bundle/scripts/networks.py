"""MoME networks: the Mixture of Modality Experts, MoME+ and their gate, classifier and dispatch parts.

References:
    Zhang et al., "A Foundation Model for Brain Lesion Segmentation with Mixture of Modality Experts",
    MICCAI 2024, https://arxiv.org/abs/2405.10246.
    Zhang et al., "A Foundation Model for Lesion Segmentation on Brain MRI with Mixture of Modality Experts",
    IEEE TMI 2025, https://doi.org/10.1109/TMI.2025.3540809 (MoME+: any subset of co-registered modalities).
    Isensee et al., "nnU-Net", Nature Methods 2021 (the expert and gate topology, see ``scripts.unet``).

Experts and gate are nnU-Net ``PlainConvUNet`` s (:mod:`scripts.unet`; re-exported here with its building blocks,
so ``scripts.networks.PlainConvUNet`` keeps working), and the authors' checkpoints load after a pure key rename
(see ``scripts.upstream``).

Axis convention: like nnU-Net with its SimpleITK reader, the networks expect arrays in ``(z, y, x)`` voxel order of
the NIfTI grid; the bundle's transforms take care of that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .unet import ConvNormAct, KernelLike, PlainConvUNet, he_init

__all__ = [
    "MODALITIES",
    "PLUS_MODALITIES",
    "ConvNormAct",
    "DispatchMLP",
    "KernelLike",
    "ModalityClassifier",
    "MoME",
    "MoMEPlus",
    "PlainConvUNet",
    "constrain_dispatch",
    "he_init",
]

MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")  # MoME's expert order (the authors'): expert k segments MODALITIES[k]
PLUS_MODALITIES = ("t1", "t1ce", "t2", "flair")  # MoME+'s channel (and expert) order (the authors')

# Eval inputs whose gate input (image + K stage-0 feature maps) would exceed this size use the memory-lean gate
# (measured with the project's CPU-lever benchmark: release 128^3 tile, 1.35 GB gate input: peak RSS 5.26 -> 3.02 GB and
# 2 % faster; demo 48^3 tile, 18 MB: the six thin convolutions are 23 % slower than one, so it keeps the concatenation).
LEAN_GATE_MIN_BYTES = 256 * 2**20


class ModalityClassifier(nn.Module):
    """Which expert's modality an image (tile) is: strided ConvNormAct stages and intensity quantiles, then an MLP.

    Our extension for MoME (``MoME(modality_classifier=True)``), not in the authors' code: the class probabilities
    set a per-expert bias of the gate's weight maps (see :class:`MoME`).

    The convolutional features are instance-normalised, so they see the image's structure but not its intensity
    levels; quantiles of the (z-scored) input intensities add those (e.g. bright CSF in T2, dark CSF in FLAIR).

    Args:
        in_channels: image channels.
        num_modalities: classes (the experts' modalities).
        width: channels of the first stage (doubled per stage).
        strides: stride of each stage; MoME passes its U-Net's downsampling strides, so any input the U-Net takes
            is big enough (the demo's 48^3 tile is seen at 6^3 before pooling).
        hidden: width of the MLP's hidden layer.

    Shapes:
        ``(B, in_channels, D, H, W)`` -> logits ``(B, num_modalities)``.
    """

    QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

    def __init__(
        self,
        in_channels: int,
        num_modalities: int,
        width: int = 8,
        strides: Sequence[KernelLike] = (2, 2, 2),
        hidden: int = 32,
    ) -> None:
        super().__init__()
        if min(in_channels, num_modalities, width, hidden) < 1:
            raise ValueError(
                f"ModalityClassifier sizes must be >= 1, got in_channels={in_channels}, "
                f"num_modalities={num_modalities}, width={width}, hidden={hidden}."
            )
        blocks, channels = [], in_channels
        for stage, stride in enumerate(strides):
            blocks.append(ConvNormAct(channels, width * 2**stage, 3, stride))
            channels = width * 2**stage
        self.features = nn.Sequential(*blocks)
        self.register_buffer("quantiles", torch.tensor(self.QUANTILES), persistent=False)
        self.max_quantile_samples = 1 << 20  # torch.quantile's input limit is 16 M; 1 M samples are plenty
        self.head = nn.Sequential(
            nn.Linear(2 * channels + in_channels * len(self.QUANTILES), hidden),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(hidden, num_modalities),
        )
        self.apply(he_init)
        nn.init.zeros_(self.head[-1].weight)  # uniform probabilities at the start: a neutral prior
        nn.init.zeros_(self.head[-1].bias)

    def intensity_quantiles(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel quantiles of ``x`` (``(B, C * len(QUANTILES))``), on at most ~1 M evenly strided voxels."""
        values = x.detach().flatten(2).float()
        step = max(1, -(-values.shape[2] // self.max_quantile_samples))
        quantiles = torch.quantile(values[:, :, ::step], self.quantiles, dim=2)  # (Q, B, C)
        return quantiles.permute(1, 2, 0).flatten(1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Max next to mean pooling: the mean of instance-normalised activations hardly depends on the input.
        features = self.features(x).flatten(2)
        pooled = [features.mean(dim=2), features.amax(dim=2), self.intensity_quantiles(x)]
        return self.head(torch.cat(pooled, dim=1))


class MoME(nn.Module):
    """Mixture of Modality Experts (MoME, MICCAI 2024).

    ``K`` expert U-Nets segment the same image; a gate U-Net of the same topology sees the image plus every
    expert's full-resolution stage-0 features and predicts ``K x C`` voxel-wise weight maps at every decoder level.
    The fused logits of level ``i`` are ``sum_k E_k[i] * W[i][:, C*k : C*(k+1)]`` with raw (not softmax-normalised)
    weights, exactly as in the authors' code.

    Args:
        num_experts: number of experts ``K`` (5 for MoME: T1, T1ce, T2, FLAIR, DWI).
        in_channels: image channels fed to every expert and to the gate.
        num_classes: classes ``C`` (2 for MoME: background, lesion).
        features_per_stage, kernel_sizes, strides, n_conv_per_stage, n_conv_per_stage_decoder: U-Net topology
            shared by experts and gate, see :class:`PlainConvUNet`.
        gate_prior_channels: prior vector width at the gate bottleneck (MoME+); 0 for MoME.
        gate_image_channels: image channels the gate sees next to the expert features; defaults to
            ``in_channels`` (MoME); MoME+ passes its ``M`` dispatched channels.
        modality_classifier: our extension, off by default (the authors' MoME): a :class:`ModalityClassifier` on the
            image whose softmax probabilities ``p`` over the ``K`` expert modalities set a per-expert bias of the
            gate's weight maps, ``W[i] + A_i p + b_i`` at every level ``i`` (``routing``, zero-initialised, so a plain
            MoME's weights load unchanged). It makes the gate modality-aware without telling the network the
            modality at inference; training supervises the classifier with the dataset's modality (``MoMELoss``
            ``modality_weight``). Why: the demo's gate gave T1, T2, FLAIR and DWI tiles the same weights, and a
            prior at the gate's bottleneck (as MoME+ feeds its availability vector) does not reach its output: the
            instance norms of every decoder stage remove a per-channel constant (measured on the demo model, 0.7.0).

    Shapes:
        eval: ``(B, in_channels, D, H, W)`` -> fused logits ``(B, C, D, H, W)``.
        train: a dict with ``fused`` (list of per-level fused logits, high -> low resolution), ``experts``
        (``K`` lists of per-level expert logits) and ``weights`` (list of per-level gate maps ``(B, K*C, ...)``),
        plus ``modality_logits`` ``(B, K)`` with the modality classifier.
    """

    __jit_unused_properties__ = ["size_divisor"]

    def __init__(
        self,
        num_experts: int,
        in_channels: int,
        num_classes: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[KernelLike],
        strides: Sequence[KernelLike],
        n_conv_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
        gate_prior_channels: int = 0,
        gate_image_channels: int | None = None,
        modality_classifier: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1 or num_classes < 1:
            raise ValueError(f"num_experts and num_classes must be >= 1, got {num_experts} and {num_classes}.")
        topology = {
            "features_per_stage": features_per_stage,
            "kernel_sizes": kernel_sizes,
            "strides": strides,
            "n_conv_per_stage": n_conv_per_stage,
            "n_conv_per_stage_decoder": n_conv_per_stage_decoder,
        }
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.experts = nn.ModuleList([PlainConvUNet(in_channels, num_classes, **topology) for _ in range(num_experts)])
        self.gate_image_channels = in_channels if gate_image_channels is None else int(gate_image_channels)
        gate_in = self.gate_image_channels + num_experts * int(features_per_stage[0])
        self.gate = PlainConvUNet(gate_in, num_experts * num_classes, prior_channels=gate_prior_channels, **topology)
        self.classifier: ModalityClassifier | None = None
        self.routing: nn.ModuleList | None = None
        if modality_classifier:
            self.classifier = ModalityClassifier(
                in_channels, num_experts, int(features_per_stage[0]), self.gate.strides[1:]
            )
            self.routing = nn.ModuleList(
                [nn.Linear(num_experts, num_experts * num_classes) for _ in range(len(self.gate.heads))]
            )
            for layer in self.routing:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def size_divisor(self) -> Tuple[int, int, int]:
        """Per-axis factor that input spatial sizes must be divisible by."""
        return self.gate.size_divisor

    def fuse(self, expert_logits: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``sum_k expert_logits[k] * weights[:, C*k : C*(k+1)]`` for one resolution level."""
        c = self.num_classes
        fused = expert_logits[0] * weights[:, 0:c]
        for k in range(1, len(expert_logits)):
            fused = fused + expert_logits[k] * weights[:, c * k : c * (k + 1)]
        return fused

    def classify(self, x: torch.Tensor) -> torch.Tensor | None:
        """The modality classifier's logits ``(B, K)`` for ``x``; ``None`` without a classifier."""
        return None if self.classifier is None else self.classifier(x)

    def _route(self, weights: List[torch.Tensor], modality_logits: torch.Tensor | None) -> List[torch.Tensor]:
        """Adds the classifier's per-expert bias to the gate's weight maps (level ``i`` of ``weights``)."""
        if self.routing is None or modality_logits is None:
            return weights
        probabilities = torch.softmax(modality_logits.float(), dim=1)
        routed: List[torch.Tensor] = []
        for level, layer in enumerate(self.routing):  # ModuleList indexing by a variable does not script
            if level < len(weights):
                routed.append(weights[level] + layer(probabilities).to(weights[level].dtype)[:, :, None, None, None])
        return routed

    def _run(
        self, x: torch.Tensor, prior: torch.Tensor | None, all_levels: bool
    ) -> Tuple[List[List[torch.Tensor]], List[torch.Tensor]]:
        """Expert logits per expert and level, and gate weights per level (every expert sees ``x``)."""
        expert_logits, weights = self._run_mixture(x, [x for _ in range(self.num_experts)], prior, all_levels)
        return expert_logits, self._route(weights, self.classify(x))

    def _run_mixture(
        self, gate_image: torch.Tensor, expert_inputs: List[torch.Tensor], prior: torch.Tensor | None, all_levels: bool
    ) -> Tuple[List[List[torch.Tensor]], List[torch.Tensor]]:
        """Runs expert ``k`` on ``expert_inputs[k]`` and the gate on ``[gate_image, stage-0 features...]``."""
        stage0: List[torch.Tensor] = [gate_image]
        expert_logits: List[List[torch.Tensor]] = []
        for k, expert in enumerate(self.experts):
            skips, logits = expert.forward_features(expert_inputs[k], None, all_levels)
            stage0.append(skips[0])
            expert_logits.append(logits)
        weights = self.gate.forward_features(torch.cat(stage0, dim=1), prior, all_levels)[1]
        return expert_logits, weights

    def _lean_gate_pays(self, x: torch.Tensor) -> bool:
        """Whether the gate input of ``x`` is large enough for :meth:`forward_lean` to pay (see LEAN_GATE_MIN_BYTES)."""
        return x.numel() // x.shape[1] * self.gate.in_channels * x.element_size() >= LEAN_GATE_MIN_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused full-resolution logits (eval); the training dict in training mode (see class docstring)."""
        if not torch.jit.is_scripting():
            if self.training:
                return self.forward_train(x)  # type: ignore[return-value]
            if self._lean_gate_pays(x):
                return self.forward_lean(x)
        expert_logits, weights = self._run(x, None, False)
        return self.fuse([levels[0] for levels in expert_logits], weights[0])

    @torch.jit.unused
    def forward_lean(
        self, x: torch.Tensor, prior: torch.Tensor | None = None, expert_inputs: List[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Fused full-resolution logits without materialising the gate's ``C_in + K * F0``-channel input.

        The gate's first convolution is linear in its input channels, so it is accumulated group by group: the
        image's share first, then each expert's share as soon as that expert has run, after which the expert's
        stage-0 features are released. Same result as :meth:`_run` + :meth:`fuse` up to float summation order;
        at MoME's 1 mm release size this saves the 161-channel tensor (1.35 GB per 128^3 tile in float32).
        ``x`` is the gate's image input; expert ``k`` sees ``expert_inputs[k]`` (default ``x``, as in MoME).
        """
        block = self.gate.encoder[0][0]
        conv = block.conv
        width = self.experts[0].features_per_stage[0]

        def gate_share(features: torch.Tensor, first: int, bias: torch.Tensor | None) -> torch.Tensor:
            weight = conv.weight[:, first : first + features.shape[1]]
            return F.conv3d(features, weight, bias, conv.stride, conv.padding, conv.dilation)

        stem = gate_share(x, 0, conv.bias)
        expert_logits: List[torch.Tensor] = []
        for k, expert in enumerate(self.experts):
            skips, levels = expert.forward_features(x if expert_inputs is None else expert_inputs[k], None, False)
            stem.add_(gate_share(skips[0], self.gate_image_channels + k * width, None))
            expert_logits.append(levels[0])
            del skips, levels
        stem = block.act(block.norm(stem))
        weights = self.gate.forward_features(stem, prior, False, first_block_done=True)[1]
        return self.fuse(expert_logits, self._route(weights, self.classify(x))[0])

    @torch.jit.unused
    def expert_foreground(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's own lesion probability ``1 - p(background)`` at full resolution, ``(B, K, X, Y, Z)``: the
        experts without the gate, to measure how much they disagree (active learning)."""
        probabilities = []
        for expert in self.experts:
            logits = expert.forward_features(x, None, False)[1][0]
            probabilities.append(1.0 - torch.softmax(logits.float(), dim=1)[:, :1])
        return torch.cat(probabilities, dim=1)

    @torch.jit.unused
    def forward_train(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> Dict[str, list]:
        """Everything a deep-supervised MoME loss needs: fused, per-expert and gate outputs at every level."""
        modality_logits = self.classify(x)
        expert_logits, weights = self._run_mixture(x, [x for _ in range(self.num_experts)], prior, True)
        weights = self._route(weights, modality_logits)
        fused = [self.fuse([levels[i] for levels in expert_logits], w) for i, w in enumerate(weights)]
        outputs: Dict[str, list] = {"fused": fused, "experts": expert_logits, "weights": weights}
        if modality_logits is not None:
            outputs["modality_logits"] = modality_logits  # type: ignore[assignment]
        return outputs


def constrain_dispatch(raw: torch.Tensor, availability: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """MoME+'s constrained dispatch matrix ``D*`` from the dispatch network's raw ``(B, M, M)`` output.

    ``raw[b, i, j]`` scores source modality ``j`` for target channel ``i``. Following the authors' code: each row is
    min-max normalised to ``(0, 1]`` (``(R - min + eps) / (max - min + eps)``); columns of missing modalities are
    zeroed (only available modalities may act as sources); rows of available modalities become unit vectors, so an
    available modality passes through unchanged. Rows are not renormalised to sum to 1 (as upstream).

    Args:
        raw: ``(B, M, M)`` dispatch scores.
        availability: ``(B, M)`` 0/1 availability vector ``c``.

    Returns:
        ``(B, M, M)`` matrix ``D*``; the dispatched image is ``S[:, i] = sum_j D*[:, i, j] * X[:, j]``.
    """
    low = raw.amin(dim=2, keepdim=True)
    high = raw.amax(dim=2, keepdim=True)
    scaled = (raw - low + eps) / (high - low + eps)
    present = availability.to(raw.dtype)
    masked = scaled * present[:, None, :]
    identity = torch.eye(raw.shape[1], dtype=raw.dtype, device=raw.device).expand_as(raw)
    return torch.where(present[:, :, None] > 0, identity, masked)


class DispatchMLP(nn.Module):
    """MoME+'s dispatch network: an MLP on the availability vector alone (not on image content).

    ``Linear(M, M) - ReLU - Linear(M, 2M) - ReLU - Linear(2M, M^2) - ReLU - Linear(M^2, M^2)``, reshaped to
    ``(B, M, M)``; for the authors' ``M = 4`` this is 4-4-8-16-16 with 476 parameters and the keys ``mlp.0/2/4/6``.
    """

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        m = int(num_modalities)
        if m < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}.")
        self.num_modalities = m
        self.mlp = nn.Sequential(
            nn.Linear(m, m), nn.ReLU(), nn.Linear(m, 2 * m), nn.ReLU(), nn.Linear(2 * m, m * m), nn.ReLU(),
            nn.Linear(m * m, m * m),
        )  # fmt: skip

    def forward(self, availability: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` availability -> ``(B, M, M)`` raw dispatch scores."""
        m = self.num_modalities
        return self.mlp(availability.to(self.mlp[0].weight.dtype)).reshape(-1, m, m)


class MoMEPlus(MoME):
    """MoME+ (IEEE TMI 2025): one model for any non-empty subset of ``M`` co-registered modalities.

    The input holds the ``M`` modalities in a fixed channel order (T1, T1ce, T2, FLAIR for the authors' model)
    with an availability vector ``c``. A dispatch MLP on ``c`` gives the constrained matrix ``D*``
    (:func:`constrain_dispatch`); the dispatched image ``S = D* X`` keeps every available channel and fills every
    missing one with a soft mix of available ones. Expert ``k`` segments ``S[:, k]``; the gate sees
    ``[S, stage-0 features of every expert]`` and receives ``c`` as constant maps at its bottleneck; fusion is
    MoME's (raw voxel- and class-wise weights at every decoder level).

    Args:
        num_modalities: ``M`` = number of experts and of input channels (4).
        num_classes: classes ``C`` (4 for the BraTS sub-regions: background, NCR, ED, ET).
        features_per_stage, kernel_sizes, strides, n_conv_per_stage, n_conv_per_stage_decoder: U-Net topology
            shared by experts and gate, see :class:`PlainConvUNet`.

    Shapes:
        ``x`` ``(B, M, D, H, W)``; ``availability`` ``(B, M)`` or ``(1, M)`` (broadcast over tiles), values 0/1,
        at least one 1 per row; ``None`` marks every channel that is not identically zero in ``x`` as available
        (only correct for whole images, not for tiles). Missing channels are ignored (zeroed before dispatch).
        Eval output: fused logits ``(B, C, D, H, W)``; training output: MoME's dict plus ``dispatch`` (``D*``).
    """

    def __init__(
        self,
        num_modalities: int,
        num_classes: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[KernelLike],
        strides: Sequence[KernelLike],
        n_conv_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
    ) -> None:
        super().__init__(
            num_experts=num_modalities,
            in_channels=1,
            num_classes=num_classes,
            features_per_stage=features_per_stage,
            kernel_sizes=kernel_sizes,
            strides=strides,
            n_conv_per_stage=n_conv_per_stage,
            n_conv_per_stage_decoder=n_conv_per_stage_decoder,
            gate_prior_channels=num_modalities,
            gate_image_channels=num_modalities,
        )
        self.num_modalities = int(num_modalities)
        self.dispatch = DispatchMLP(num_modalities)

    def availability_of(self, x: torch.Tensor, availability: torch.Tensor | None) -> torch.Tensor:
        """Checked ``(B, M)`` float availability for ``x``; derived from non-zero channels when ``None``."""
        batch, channels = x.shape[0], x.shape[1]
        if channels != self.num_modalities:
            raise ValueError(f"MoME+ expects {self.num_modalities} input channels, got {channels}.")
        if availability is None:
            availability = (x.detach().flatten(2).abs().amax(dim=2) > 0).to(x.dtype)
        availability = availability.to(device=x.device, dtype=x.dtype).reshape(-1, channels)
        if availability.shape[0] == 1 and batch > 1:
            availability = availability.expand(batch, -1)
        if availability.shape[0] != batch:
            raise ValueError(f"availability has {availability.shape[0]} rows for a batch of {batch}.")
        if not bool(((availability == 0) | (availability == 1)).all()) or not bool((availability.sum(1) > 0).all()):
            raise ValueError("availability must be 0/1 with at least one available modality per sample.")
        return availability

    def dispatch_matrix(self, availability: torch.Tensor) -> torch.Tensor:
        """``(B, M, M)`` constrained dispatch matrix ``D*`` for a checked availability vector."""
        return constrain_dispatch(self.dispatch(availability), availability).to(availability.dtype)

    def dispatched(self, x: torch.Tensor, availability: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(S, D*)``: the dispatched image ``S = D* X`` (missing channels of ``x`` zeroed first) and ``D*``."""
        matrix = self.dispatch_matrix(availability)
        present = x * availability[:, :, None, None, None]
        return torch.einsum("bij,bj...->bi...", matrix, present), matrix

    def forward(self, x: torch.Tensor, availability: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Fused full-resolution logits (eval); the training dict in training mode (see class docstring)."""
        if self.training:
            return self.forward_train(x, availability)  # type: ignore[return-value]
        c = self.availability_of(x, availability)
        s, _ = self.dispatched(x, c)
        inputs = [s[:, k : k + 1] for k in range(self.num_experts)]
        if self._lean_gate_pays(s):
            return self.forward_lean(s, c, inputs)
        expert_logits, weights = self._run_mixture(s, inputs, c, False)
        return self.fuse([levels[0] for levels in expert_logits], weights[0])

    def forward_train(  # type: ignore[override]
        self, x: torch.Tensor, availability: torch.Tensor | None = None
    ) -> Dict[str, object]:
        """Fused, per-expert and gate outputs at every level, plus the dispatch matrix, for the MoME+ loss."""
        c = self.availability_of(x, availability)
        s, matrix = self.dispatched(x, c)
        inputs = [s[:, k : k + 1] for k in range(self.num_experts)]
        expert_logits, weights = self._run_mixture(s, inputs, c, True)
        fused = [self.fuse([levels[i] for levels in expert_logits], w) for i, w in enumerate(weights)]
        return {"fused": fused, "experts": expert_logits, "weights": weights, "dispatch": matrix, "availability": c}
