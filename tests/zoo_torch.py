"""Small plain-``torch.nn`` test models covering the architecture patterns the
ONNX pruner has to handle, plus helpers to export them to ONNX with either
exporter (TorchScript ``dynamo=False`` or torch.export ``dynamo=True``).

Every model is tiny (4-32 channels, 8-16 px), built under a fixed per-case seed,
has randomised BatchNorm / norm statistics and affine parameters, non-zero
biases and is returned in ``eval()`` mode, together with its example inputs
(batch 2).

Usage::

    from zoo_torch import TORCH_CASES, export, run_torch, run_onnx
    case = TORCH_CASES["resnet_basic_identity"]
    model, inputs = case.make()
    path = export(case, tmp / "m.onnx", dynamo=False)
    ref = run_torch(model, inputs)
    out = run_onnx(path, inputs)

Naming in the exported graphs: inputs are ``x`` (single input) or
``x0, x1, ...``; outputs are ``y`` (single output) or ``y0, y1, ...``.
The batch dimension is dynamic for both exporters (symbolic dim ``N`` for
TorchScript, ``batch`` for dynamo) unless the case says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 2
TORCHSCRIPT_OPSET = 17
# None -> the dynamo exporter's default opset (18+ depending on the torch version).
DYNAMO_OPSET: int | None = None


@dataclass
class TorchCase:
    name: str
    make: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    # False where *every* channel must legitimately stay (nothing prunable).
    prunable: bool = True
    note: str = ""
    # The dynamo exporter fails on this case (error recorded in dynamo_error).
    dynamo_ok: bool = True
    dynamo_error: str = ""
    # Export with a dynamic batch dimension (False -> static batch BATCH).
    dynamic_batch: bool = True
    tags: tuple[str, ...] = ()


TORCH_CASES: dict[str, TorchCase] = {}


# ---------------------------------------------------------------------------
# initialisation helpers
# ---------------------------------------------------------------------------


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial statistics/affine params, make every bias
    non-zero and PReLU slopes per-channel distinct. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def U(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    def N(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            N(m.running_mean, 0.5)
            U(m.running_var, 0.5, 2.0)
            if m.affine:
                U(m.weight, 0.5, 1.5)
                N(m.bias, 0.3)
        elif isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm, nn.GroupNorm)):
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            if w is not None:
                U(w, 0.5, 1.5)
            if b is not None:
                N(b, 0.3)
        elif isinstance(m, nn.PReLU):
            U(m.weight, 0.05, 0.5)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if m.bias is not None:
                N(m.bias, 0.2)
    return model


def _case(
    name: str,
    note: str = "",
    inputs: Sequence[tuple[int, ...]] = ((3, 8, 8),),
    prunable: bool = True,
    tags: tuple[str, ...] = (),
    **kw,
):
    """Register ``builder() -> nn.Module`` as a TorchCase called ``name``."""

    def deco(builder: Callable[[], nn.Module]):
        def make() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
            seed = _seed_of(name)
            torch.manual_seed(seed)
            model = builder()
            randomize_(model, seed)
            model.eval()
            g = torch.Generator().manual_seed(seed + 1)
            xs = tuple(torch.randn((BATCH, *s), generator=g) for s in inputs)
            return model, xs

        make.__name__ = f"make_{name}"
        TORCH_CASES[name] = TorchCase(name=name, make=make, prunable=prunable, note=note, tags=tags, **kw)
        return builder

    return deco


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: nn.Module | None = None,
                bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------
# basic chains
# ---------------------------------------------------------------------------


@_case("conv_bn_relu_chain", "Conv-BN-ReLU x2 -> GAP -> Flatten -> Linear", tags=("chain",))
def _():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )


@_case("conv_nobias", "bias=False convs, one followed by BN and one directly by ReLU", tags=("chain",))
def _():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 6, 1, bias=False),
    )


@_case("single_conv_output", "only conv feeds the graph output -> every channel must stay",
       prunable=False, tags=("negative",))
def _():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))


# activations: Conv(3->8) -> BN -> act -> Conv(8->6)
_ACTIVATIONS: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "leakyrelu": (lambda c: nn.LeakyReLU(0.1), ""),
    "prelu_channel": (lambda c: nn.PReLU(num_parameters=c), "per-channel slope (PRelu slope [C,1,1]) must be sliced"),
    "relu6": (lambda c: nn.ReLU6(), "Clip(0,6)"),
    "hardtanh_clip": (lambda c: nn.Hardtanh(-1.0, 2.0), "Clip(-1,2)"),
    "sigmoid": (lambda c: nn.Sigmoid(), "act(0)=0.5 != 0"),
    "hardsigmoid": (lambda c: nn.Hardsigmoid(), "act(0)=0.5 != 0"),
    "hardswish": (lambda c: nn.Hardswish(), ""),
    "tanh": (lambda c: nn.Tanh(), ""),
    "silu": (lambda c: nn.SiLU(), "x*sigmoid(x)"),
    "gelu": (lambda c: nn.GELU(approximate="none"), "erf form"),
    "gelu_tanh": (lambda c: nn.GELU(approximate="tanh"), "tanh approximation"),
    "softplus": (lambda c: nn.Softplus(), "act(0)=log 2 != 0"),
    "elu": (lambda c: nn.ELU(), ""),
}


def _register_act(act_name: str, factory: Callable[[int], nn.Module], note: str) -> None:
    @_case(f"act_{act_name}", f"Conv-BN-{act_name}-Conv. {note}".strip(), tags=("activation",))
    def _():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), factory(8),
            nn.Conv2d(8, 6, 3, padding=1),
        )


for _n, (_f, _note) in _ACTIVATIONS.items():
    _register_act(_n, _f, _note)


@_case("dropout_identity", "Dropout/Dropout2d (eval) and Identity between convs; vanish on export", tags=("chain",))
def _():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Identity(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
        nn.Conv2d(8, 6, 1),
    )


@_case("instancenorm_affine", "InstanceNorm2d(affine=True) is per-channel -> prunable", tags=("norm",))
def _():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
    )


@_case("groupnorm", "GroupNorm(2 groups) couples channels within a group (stats) -> conv1 out must be frozen, "
       "or pruned in whole groups; stem conv0 prunable", tags=("norm",))
def _():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 6, 1),
    )


@_case("softmax_channels", "Softmax over the channel axis couples all channels of conv0; conv1 reaches the output "
       "-> nothing prunable", prunable=False, tags=("negative",))
def _():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softmax(dim=1), nn.Conv2d(8, 6, 1))


# ---------------------------------------------------------------------------
# residual networks
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + idt)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + idt)


class StemBodyHead(nn.Module):
    """stem conv-bn-relu -> body -> GAP -> flatten -> Linear"""

    def __init__(self, cin: int, cstem: int, body: nn.Module, cbody: int, ncls: int = 5):
        super().__init__()
        self.stem = conv_bn_act(cin, cstem, act=nn.ReLU())
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cbody, ncls)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@_case("resnet_basic_identity", "stem + BasicBlock with identity shortcut (stem/conv2 channels tied by the add)",
       tags=("residual",))
def _():
    return StemBodyHead(3, 8, BasicBlock(8, 8), 8)


@_case("resnet_basic_projection", "BasicBlock 8->16 stride 2 with 1x1 conv+BN projection shortcut",
       tags=("residual",))
def _():
    return StemBodyHead(3, 8, BasicBlock(8, 16, stride=2), 16)


@_case("resnet_bottleneck", "Bottleneck 16->(4,4)->16 identity shortcut", tags=("residual",))
def _():
    return StemBodyHead(3, 16, Bottleneck(16, 4, 16), 16)


@_case("resnet_bottleneck_projection", "Bottleneck 8->(4,4)->16 stride 2 with projection shortcut",
       tags=("residual",))
def _():
    return StemBodyHead(3, 8, Bottleneck(8, 4, 16, stride=2), 16)


@_case("resnet_stage_2blocks", "two identity BasicBlocks chained: stem, block1.conv2 and block2.conv2 share one "
       "channel group across two adds", tags=("residual",))
def _():
    return StemBodyHead(3, 8, nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)), 8)


# ---------------------------------------------------------------------------
# concat / split / slice
# ---------------------------------------------------------------------------


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, act=nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 3, 1), nn.ReLU())
        self.head = nn.Conv2d(13, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1))


@_case("inception_concat", "3 branches (4+6+3 ch) concatenated on channels -> conv(13->6)", tags=("concat",))
def _():
    return InceptionLike()


class ConcatResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, act=nn.ReLU())
        self.a = nn.Conv2d(8, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(8, 10, 1)
        self.head = nn.Conv2d(10, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        s = torch.cat([self.a(x), self.b(x)], 1) + self.c(x)
        return self.head(F.relu(s))


@_case("concat_residual", "cat(a:4, b:6) + c:10 -> channels of a/b are tied to slices of c", tags=("concat", "residual"))
def _():
    return ConcatResidual()


class SplitBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 12, act=nn.ReLU())
        self.a = nn.Conv2d(4, 5, 3, padding=1)
        self.b = nn.Conv2d(8, 7, 1)
        self.head = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [4, 8], dim=1)
        return self.head(torch.cat([F.relu(self.a(a)), torch.sigmoid(self.b(b))], 1))


@_case("split_uneven", "torch.split(x, [4, 8], dim=1) into two different branches, then cat", tags=("split",))
def _():
    return SplitBranches()


class ChunkBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 12, act=nn.ReLU())
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        return self.head(F.relu(self.a(F.relu(a)) + self.b(torch.tanh(b))))


@_case("chunk_branches", "x.chunk(2, dim=1), different branches, add", tags=("split",))
def _():
    return ChunkBranches()


class SlicePrefix(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 12, act=nn.ReLU())
        self.head = nn.Conv2d(5, 6, 3, padding=1)

    def forward(self, x):
        return self.head(self.stem(x)[:, :5])


@_case("slice_prefix", "x[:, :5] of a 12-channel map; channels 5..11 are dead", tags=("slice",))
def _():
    return SlicePrefix()


class SliceTwoRanges(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 12, act=nn.ReLU())
        self.a = nn.Conv2d(5, 6, 3, padding=1)
        self.b = nn.Conv2d(7, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.relu(self.a(h[:, :5]) + self.b(h[:, 5:])))


@_case("slice_two_ranges", "x[:, :5] and x[:, 5:] into different convs", tags=("slice",))
def _():
    return SliceTwoRanges()


# ---------------------------------------------------------------------------
# depthwise / grouped
# ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int):
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            conv_bn_act(c, h, 1, act=nn.ReLU6()),
            conv_bn_act(h, h, 3, groups=h, act=nn.ReLU6()),
            conv_bn_act(h, c, 1),
        )

    def forward(self, x):
        return x + self.block(x)


@_case("mobilenetv2_block", "pw(8->24)-BN-ReLU6 -> dw(24, groups=24)-BN-ReLU6 -> pw(24->8)-BN + residual",
       tags=("depthwise", "residual"))
def _():
    return nn.Sequential(conv_bn_act(3, 8, act=nn.ReLU6()), InvertedResidual(8, 3), nn.Conv2d(8, 6, 1))


@_case("depthwise_multiplier2", "depthwise conv groups=8, 8->16 (channel multiplier 2): out 2i,2i+1 <- in i",
       tags=("depthwise",))
def _():
    return nn.Sequential(
        conv_bn_act(3, 8, act=nn.ReLU()),
        conv_bn_act(8, 16, 3, groups=8, act=nn.ReLU()),
        nn.Conv2d(16, 6, 1),
    )


@_case("grouped_conv", "grouped conv groups=2, 8->8", tags=("grouped",))
def _():
    return nn.Sequential(
        conv_bn_act(3, 8, act=nn.ReLU()),
        conv_bn_act(8, 8, 3, groups=2, act=nn.ReLU()),
        nn.Conv2d(8, 6, 1),
    )


@_case("grouped_conv_expand", "grouped conv groups=2, 8->12 (4 in / 6 out per group)", tags=("grouped",))
def _():
    return nn.Sequential(
        conv_bn_act(3, 8, act=nn.ReLU()),
        conv_bn_act(8, 12, 3, groups=2, act=nn.ReLU()),
        nn.Conv2d(12, 6, 1),
    )


# ---------------------------------------------------------------------------
# pooling / resampling / padding
# ---------------------------------------------------------------------------


@_case("pooling", "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1) -> Linear", inputs=((3, 16, 16),), tags=("pool",))
def _():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(12, 5),
    )


@_case("upsample_nearest", "nn.Upsample(scale_factor=2, mode='nearest')", tags=("resize",))
def _():
    return nn.Sequential(
        conv_bn_act(3, 8, act=nn.ReLU()), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 6, 3, padding=1),
    )


class InterpBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = conv_bn_act(3, 8, act=nn.ReLU())
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.c2(F.interpolate(self.c1(x), scale_factor=2, mode="bilinear", align_corners=False))


@_case("interpolate_bilinear", "F.interpolate(scale_factor=2, mode='bilinear', align_corners=False)", tags=("resize",))
def _():
    return InterpBilinear()


class PadModel(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1 = conv_bn_act(3, 8, act=nn.ReLU())
        self.c2 = nn.Conv2d(8, 6, 3)

    def forward(self, x):
        h = self.c1(x)
        if self.mode == "constant":
            h = F.pad(h, (1, 1, 2, 0), mode="constant", value=0.0)
        else:
            h = F.pad(h, (1, 1, 1, 1), mode=self.mode)
        return self.c2(h)


@_case("pad_constant", "F.pad spatial (1,1,2,0) constant 0", tags=("pad",))
def _():
    return PadModel("constant")


@_case("pad_reflect", "F.pad spatial (1,1,1,1) reflect", tags=("pad",))
def _():
    return PadModel("reflect")


# ---------------------------------------------------------------------------
# squeeze-excitation
# ---------------------------------------------------------------------------


class SE(nn.Module):
    def __init__(self, c: int, r: int, hard: bool):
        super().__init__()
        self.hard = hard
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x):
        # the hard variant uses x.mean((2,3), keepdim=True) like MobileNetV3 implementations
        s = x.mean((2, 3), keepdim=True) if self.hard else self.pool(x)
        s = self.gate(self.fc2(F.relu(self.fc1(s))))
        return x * s


@_case("se_block", "GAP -> conv1x1(8->4) -> ReLU -> conv1x1(4->8) -> Sigmoid -> mul", tags=("se",))
def _():
    return nn.Sequential(conv_bn_act(3, 8, act=nn.ReLU()), SE(8, 4, hard=False), nn.Conv2d(8, 6, 1))


@_case("se_block_hardsigmoid", "mean((2,3),keepdim) -> conv1x1 -> ReLU -> conv1x1 -> Hardsigmoid -> mul",
       tags=("se",))
def _():
    return nn.Sequential(conv_bn_act(3, 8, act=nn.Hardswish()), SE(8, 4, hard=True), nn.Conv2d(8, 6, 1))


# ---------------------------------------------------------------------------
# flatten into Linear
# ---------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self, use_view: bool):
        super().__init__()
        self.use_view = use_view
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(12 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1) if self.use_view else torch.flatten(x, 1)
        return self.classifier(x)


@_case("vgg_flatten", "conv(8->12)+MaxPool -> torch.flatten(x,1) of 12x4x4 -> Linear(192->16): each channel owns 16 "
       "consecutive Linear input columns", tags=("flatten",))
def _():
    return VGG(use_view=False)


@_case("vgg_view", "same as vgg_flatten with x.view(x.size(0), -1)", tags=("flatten",))
def _():
    return VGG(use_view=True)


class RuntimeShapes(nn.Module):
    """Channel counts read at run time (Shape -> Gather with a dynamic batch)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = h * h.mean((2, 3), keepdim=True).expand_as(h)
        b, c, hh, ww = h.size(0), h.size(1), h.size(2), h.size(3)
        h = h.view(b, c, -1).softmax(dim=-1).view(b, c, hh, ww)
        return self.head(torch.relu(self.c2(h)))


@_case("runtime_view_expand_as", "x.expand_as(y) and x.view(x.size(0), x.size(1), -1) and back: the channel "
       "count is read at run time and used consistently, so c1 stays prunable", tags=("flatten", "broadcast"))
def _():
    return RuntimeShapes()


# ---------------------------------------------------------------------------
# NHWC / ConvNeXt
# ---------------------------------------------------------------------------


class NHWCLinearLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.c2 = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        h = self.c1(x).permute(0, 2, 3, 1)
        h = self.ln(self.fc(h))
        return self.c2(h.permute(0, 3, 1, 2))


@_case("nhwc_linear_layernorm", "conv(3->8) -> permute NHWC -> Linear(8->12) (MatMul) -> LayerNorm(12) -> permute "
       "back -> conv. c1 out prunable (via fc rows); fc out frozen by LayerNorm", tags=("nhwc", "layernorm"))
def _():
    return NHWCLinearLN()


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, use_ln: bool):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6) if use_ln else nn.Identity()
        self.pw1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)  # layer scale

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(self.norm(h))))
        h = (self.gamma * h).permute(0, 3, 1, 2)
        return x + h


class ConvNeXtLike(nn.Module):
    def __init__(self, use_ln: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = ConvNeXtBlock(8, use_ln)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@_case("convnext_block", "dw7x7 -> permute -> LayerNorm(8) -> Linear(8->32) -> GELU -> Linear(32->8) -> gamma* -> "
       "permute -> +x. hidden 32 prunable; 8 frozen by LayerNorm", tags=("nhwc", "layernorm", "residual"))
def _():
    return ConvNeXtLike(use_ln=True)


@_case("convnext_block_noln", "convnext_block without LayerNorm: the residual 8 channels are prunable too "
       "(dw conv, gamma and pw2 columns tied to the stem)", tags=("nhwc", "residual"))
def _():
    return ConvNeXtLike(use_ln=False)


# ---------------------------------------------------------------------------
# ShuffleNetV2
# ---------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit; stride 1 (chunk) or stride 2 (two branches)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        b = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
            )
            c2 = cin
        else:
            assert cin == cout
            self.branch1 = nn.Sequential()
            c2 = b
        self.branch2 = nn.Sequential(
            nn.Conv2d(c2, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
            nn.Conv2d(b, b, 3, stride, 1, groups=b, bias=False), nn.BatchNorm2d(b),
            nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def _shufflenet(units: list[tuple[int, int, int]], cstem: int, chead: int) -> nn.Module:
    return nn.Sequential(
        conv_bn_act(3, cstem, act=nn.ReLU()),
        *[ShuffleUnit(a, b, s) for a, b, s in units],
        nn.Conv2d(chead, 6, 1),
    )


@_case("shufflenet_unit", "chunk(2) -> [identity | pw-dw-pw] -> cat -> view(N,2,C/2,H,W)-transpose(1,2)-view(N,C,H,W)",
       tags=("shuffle",))
def _():
    return _shufflenet([(8, 8, 1)], 8, 8)


@_case("shufflenet_two_units", "two stride-1 ShuffleNetV2 units stacked (shuffle permutes the identity half)",
       tags=("shuffle",))
def _():
    return _shufflenet([(8, 8, 1), (8, 8, 1)], 8, 8)


@_case("shufflenet_down", "stride-2 ShuffleNetV2 unit 8->16 (two branches) then a stride-1 unit",
       tags=("shuffle",))
def _():
    return _shufflenet([(8, 16, 2), (16, 16, 1)], 8, 16)


# ---------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------


@_case("conv_transpose", "ConvTranspose2d(8->6, k2, s2) (weight [Cin,Cout,k,k]) -> BN -> ReLU -> conv",
       tags=("convtranspose",))
def _():
    return nn.Sequential(
        conv_bn_act(3, 8, act=nn.ReLU()),
        nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    )


class TransformerMLP(nn.Module):
    def __init__(self, d: int, pre_ln: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d) if pre_ln else nn.Identity()
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@_case("transformer_mlp", "tokens [N,T=6,D=8]: x + Linear(32->8)(GELU(Linear(8->32)(x))); hidden 32 prunable, "
       "D tied to the input/output", inputs=((6, 8),), tags=("mlp",))
def _():
    return TransformerMLP(8, pre_ln=False)


@_case("transformer_mlp_preln", "transformer_mlp with a pre-LayerNorm", inputs=((6, 8),), tags=("mlp", "layernorm"))
def _():
    return TransformerMLP(8, pre_ln=True)


@_case("mlp_plain", "[N,12] Linear(12->24) -> ReLU -> Linear(24->5)", inputs=((12,),), tags=("mlp",))
def _():
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))


@_case("conv1d", "Conv1d-BN1d-ReLU-Conv1d-ReLU-AdaptiveAvgPool1d-Flatten-Linear on [N,3,16]", inputs=((3, 16),),
       tags=("conv1d",))
def _():
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(12, 5),
    )


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = conv_bn_act(3, 8, act=nn.ReLU())
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        feat = self.c1(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.c2(feat)), 1), 1))
        return feat, logits


@_case("two_outputs", "outputs (feat, logits); feat (c1 out) is a graph output -> frozen; c2 out prunable",
       tags=("multi_io",))
def _():
    return TwoOutputs()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x0, x1):
        return self.head(F.relu(self.a(x0) + self.b(x1)))


class SharedConvReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, act=nn.ReLU())
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return self.head(h)


@_case("shared_conv_reused", "one Conv2d module applied twice (weight tying): its weight/bias initializers are used "
       "by two Conv nodes; stem out, shared in and shared out form a single channel group", tags=("shared",))
def _():
    return SharedConvReused()


@_case("two_inputs", "x0 [N,3,8,8] and x1 [N,4,8,8]; conv a(x0)+conv b(x1) -> ReLU -> conv", inputs=((3, 8, 8), (4, 8, 8)),
       tags=("multi_io",))
def _():
    return TwoInputs()


# ---------------------------------------------------------------------------
# export / run helpers
# ---------------------------------------------------------------------------


def io_names(n_in: int, n_out: int) -> tuple[list[str], list[str]]:
    ins = ["x"] if n_in == 1 else [f"x{i}" for i in range(n_in)]
    outs = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    return ins, outs


@torch.no_grad()
def run_torch(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    out = model(*inputs)
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.detach().cpu().numpy() for o in out]


def feeds(inputs: Sequence[torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    names, _ = io_names(len(inputs), 1)
    return {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)) for n, x in zip(names, inputs)}


def run_onnx(path_or_model, inputs: Sequence[torch.Tensor | np.ndarray] | dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    src = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    fd = inputs if isinstance(inputs, dict) else feeds(inputs)
    return sess.run(None, fd)


def assert_self_contained(path: str | os.PathLike) -> None:
    """The ONNX file must carry all its weights (no external data files)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    tensors = list(m.graph.initializer)
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                tensors.append(a.t)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise AssertionError(f"{path}: tensor {t.name!r} uses external data")


@contextlib.contextmanager
def _without_bn_fusion(active: bool):
    """Temporarily drop onnxscript's BatchNormalization-fusion rewrite rules."""
    if not active:
        yield
        return
    import onnxscript.rewriter as rw
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    old = rw._DEFAULT_REWRITE_RULES
    excluded = set(_fuse_batchnorm.rules)
    rw._DEFAULT_REWRITE_RULES = tuple(r for r in old if r not in excluded)
    try:
        yield
    finally:
        rw._DEFAULT_REWRITE_RULES = old


def export(
    case_or_module: TorchCase | nn.Module,
    path: str | os.PathLike,
    dynamo: bool,
    inputs: Sequence[torch.Tensor] | None = None,
    dynamic_batch: bool | None = None,
    opset: int | None = None,
    keep_bn: bool = False,
) -> Path:
    """Export the eval-mode module to ``path`` and return ``path``.

    ``case_or_module``: a TorchCase (built via ``make()``, its example inputs are
    used unless ``inputs`` is given) or an ``nn.Module`` (then ``inputs`` is required).
    ``dynamo=False``: TorchScript exporter, opset 17, dynamic_axes batch 0 ("N"),
    do_constant_folding=True.  ``dynamo=True``: torch.export based exporter with
    ``dynamic_shapes`` batch dim ``batch``, saved self-contained (no external data).

    Both exporters fold eval-mode BatchNorm into the preceding Conv/ConvTranspose/Gemm
    by default (TorchScript: eval peephole pass; dynamo: onnxscript's
    fuse_batchnorm rewrite rules), so normally no BatchNormalization node survives.
    ``keep_bn=True`` keeps standalone ``BatchNormalization`` nodes: TorchScript is
    run with ``training=TrainingMode.PRESERVE`` (model is in eval mode, so BN is
    exported in inference form but the eval peephole fusion is skipped); dynamo is
    run with onnxscript's batchnorm-fusion rules temporarily removed from the
    default rewrite rule list (all other optimisations stay on).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(case_or_module, TorchCase):
        model, ex_inputs = case_or_module.make()
        if dynamic_batch is None:
            dynamic_batch = case_or_module.dynamic_batch
        inputs = ex_inputs if inputs is None else inputs
    else:
        model = case_or_module
        if inputs is None:
            raise ValueError("inputs required when exporting a bare module")
    if dynamic_batch is None:
        dynamic_batch = True
    model.eval()
    inputs = tuple(inputs)
    with torch.no_grad():
        out = model(*inputs)
    n_out = 1 if isinstance(out, torch.Tensor) else len(out)
    in_names, out_names = io_names(len(inputs), n_out)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            kw = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                kw["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
            with _without_bn_fusion(keep_bn):
                prog = torch.onnx.export(
                    model, inputs, input_names=in_names, output_names=out_names, dynamo=True,
                    opset_version=opset if opset is not None else DYNAMO_OPSET, verbose=False, **kw,
                )
            prog.save(str(path), external_data=False)
        else:
            dyn = {n: {0: "N"} for n in in_names + out_names} if dynamic_batch else None
            torch.onnx.export(
                model, inputs, str(path), input_names=in_names, output_names=out_names, dynamo=False,
                opset_version=opset if opset is not None else TORCHSCRIPT_OPSET, dynamic_axes=dyn,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
            )
    assert_self_contained(path)
    return path


def case_names(tag: str | None = None) -> list[str]:
    return [n for n, c in TORCH_CASES.items() if tag is None or tag in c.tags]
