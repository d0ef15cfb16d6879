"""Plain-PyTorch reference models for onnxprune benchmarks (no torchvision).

Module and parameter names follow torchvision's layout, so a torchvision
``state_dict`` loads into the default-width models unchanged.

Every model exposes ``width_spec()``: an ordered ``{name: default_width}``
mapping of all independently settable channel counts. Widths can be changed
with

* ``channel_scale`` (float) + ``round_to`` (int) + ``round_mode``: every
  width ``w`` becomes ``align(floor(w * channel_scale), round_to, round_mode)``
  (``round_to=1`` means no alignment, i.e. the plain floor);
* ``channels``: explicit widths, either a ``{name: width}`` dict (partial
  overrides allowed) or a list with one entry per ``width_spec()`` name;
* ``channel_fn(name, default) -> width`` for anything else.

Width names
-----------
ResNet:       ``stem``, ``layer{s}.out`` (residual stream of stage s, shared
              by all blocks of the stage and the downsample branch),
              ``layer{s}.{b}.conv1`` (+ ``layer{s}.{b}.conv2`` for
              Bottleneck) -- the block-internal widths.
MobileNetV2:  ``stem``, ``stage{j}.out`` (output of the j-th inverted-residual
              setting; residual-connected blocks share it),
              ``features.{i}.hidden`` (expanded/depthwise width of block i;
              absent for expand_ratio 1 blocks), ``last`` (the 1280 conv).

Standalone usage::

    python benchmarks/models.py --export-resnet50 benchmarks/_work/resnet50.onnx
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

ChannelFn = Callable[[str, int], int]


# --------------------------------------------------------------------------
# width helpers
# --------------------------------------------------------------------------
def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision/TF ``_make_divisible``: round to nearest multiple, never
    going below 90% of ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def align(c: int, round_to: int = 1, mode: str = "nearest", upper: int | None = None) -> int:
    """Align a channel count ``c`` to a multiple of ``round_to``.

    mode: ``nearest`` (ties go up), ``up`` (ceil) or ``down`` (floor).
    The result is at least ``round_to`` (and at least 1) and, when ``upper``
    is given and is itself >= round_to, at most ``upper`` rounded down to a
    multiple (a pruned layer never gets wider than the original).
    """
    c = int(c)
    if round_to <= 1:
        out = c
    elif mode == "nearest":
        out = int(math.floor(c / round_to + 0.5)) * round_to
    elif mode == "up":
        out = -(-c // round_to) * round_to
    elif mode == "down":
        out = (c // round_to) * round_to
    else:
        raise ValueError(f"unknown round mode {mode!r}")
    out = max(out, round_to, 1)
    if upper is not None and out > upper:
        out = upper if round_to <= 1 else max((upper // round_to) * round_to, min(upper, round_to))
    return out


def make_channel_fn(
    channel_scale: float = 1.0,
    round_to: int = 1,
    round_mode: str = "nearest",
    channels: Mapping[str, int] | None = None,
    channel_fn: ChannelFn | None = None,
) -> ChannelFn:
    """Combine the width options into one ``(name, default) -> width`` fn."""
    explicit = dict(channels or {})

    def fn(name: str, default: int) -> int:
        if name in explicit:
            return int(explicit[name])
        if channel_fn is not None:
            return int(channel_fn(name, default))
        if channel_scale == 1.0 and round_to <= 1:
            return default
        scaled = max(1, int(math.floor(default * channel_scale + 1e-9)))
        return align(scaled, round_to, round_mode, upper=default)

    return fn


def _channels_to_mapping(channels, spec_names: Sequence[str]) -> dict[str, int] | None:
    if channels is None:
        return None
    if isinstance(channels, Mapping):
        unknown = set(channels) - set(spec_names)
        if unknown:
            raise KeyError(f"unknown width names: {sorted(unknown)}")
        return dict(channels)
    channels = list(channels)
    if len(channels) != len(spec_names):
        raise ValueError(f"channels list has {len(channels)} entries, width_spec has {len(spec_names)}")
    return dict(zip(spec_names, channels))


def _widths(spec, channel_scale, round_to, round_mode, channels, channel_fn) -> OrderedDict:
    """Every settable width of a model's `width_spec`, after scaling, overrides, rounding."""
    fn = make_channel_fn(channel_scale, round_to, round_mode,
                         _channels_to_mapping(channels, list(spec)), channel_fn)
    return OrderedDict((k, fn(k, v)) for k, v in spec.items())


# --------------------------------------------------------------------------
# ResNet (torchvision layout, v1.5: stride on the 3x3 conv)
# --------------------------------------------------------------------------
def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1
    n_inner = 1  # block-internal widths: conv1

    def __init__(self, inplanes: int, inner: Sequence[int], outplanes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        (w1,) = inner
        self.conv1 = conv3x3(inplanes, w1, stride)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(w1, outplanes)
        self.bn2 = nn.BatchNorm2d(outplanes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4
    n_inner = 2  # conv1, conv2

    def __init__(self, inplanes: int, inner: Sequence[int], outplanes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        w1, w2 = inner
        self.conv1 = conv1x1(inplanes, w1)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = conv3x3(w1, w2, stride)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = conv1x1(w2, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        width_per_stage: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        channel_scale: float = 1.0,
        round_to: int = 1,
        round_mode: str = "nearest",
        channels: Mapping[str, int] | Sequence[int] | None = None,
        channel_fn: ChannelFn | None = None,
    ):
        super().__init__()
        self.block = block
        self.layers_cfg = list(layers)
        self.width_per_stage = list(width_per_stage)
        self.stem_width = stem_width
        spec = self.width_spec()
        self.widths = _widths(spec, channel_scale, round_to, round_mode, channels, channel_fn)
        w = self.widths

        self.inplanes = w["stem"]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for s, n_blocks in enumerate(self.layers_cfg, start=1):
            stride = 1 if s == 1 else 2
            setattr(self, f"layer{s}", self._make_layer(s, n_blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w[f"layer{len(self.layers_cfg)}.out"], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def width_spec(self) -> "OrderedDict[str, int]":
        """Ordered {name: default width} of every settable channel count."""
        spec: OrderedDict[str, int] = OrderedDict(stem=self.stem_width)
        inner_names = ["conv1", "conv2"][: self.block.n_inner]
        for s, (n_blocks, planes) in enumerate(zip(self.layers_cfg, self.width_per_stage), start=1):
            spec[f"layer{s}.out"] = planes * self.block.expansion
            for b in range(n_blocks):
                for nm in inner_names:
                    spec[f"layer{s}.{b}.{nm}"] = planes
        return spec

    def _make_layer(self, s: int, blocks: int, stride: int) -> nn.Sequential:
        w = self.widths
        out = w[f"layer{s}.out"]
        inner_names = ["conv1", "conv2"][: self.block.n_inner]
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = []
        for b in range(blocks):
            inner = [w[f"layer{s}.{b}.{nm}"] for nm in inner_names]
            layers.append(self.block(self.inplanes, inner, out,
                                     stride if b == 0 else 1, downsample if b == 0 else None))
            self.inplanes = out
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, len(self.layers_cfg) + 1):
            x = getattr(self, f"layer{s}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


def resnet34(**kw) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


# --------------------------------------------------------------------------
# MobileNetV2 (torchvision layout)
# --------------------------------------------------------------------------
def conv_bn_act(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # torchvision's Conv2dNormActivation is a Sequential(conv, bn, relu6):
    # same state_dict keys (.0.weight, .1.running_mean, ...).
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, hidden: int, oup: int, stride: int, expand: bool):
        super().__init__()
        assert stride in (1, 2)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand:
            layers.append(conv_bn_act(inp, hidden, kernel=1))
        else:
            assert hidden == inp, "expand_ratio 1 block: hidden width must equal input width"
        layers += [
            conv_bn_act(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expand ratio), c (out channels), n (repeats), s (first stride)
    SETTINGS = [
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
        channel_scale: float = 1.0,
        round_to: int = 1,
        round_mode: str = "nearest",
        channels: Mapping[str, int] | Sequence[int] | None = None,
        channel_fn: ChannelFn | None = None,
    ):
        super().__init__()
        self.width_mult = width_mult
        self.round_nearest = round_nearest
        spec = self.width_spec()
        self.widths = _widths(spec, channel_scale, round_to, round_mode, channels, channel_fn)
        w = self.widths

        inp = w["stem"]
        features: list[nn.Module] = [conv_bn_act(3, inp, stride=2)]
        idx = 1
        for j, (t, _c, n, s) in enumerate(self.SETTINGS):
            oup = w[f"stage{j}.out"]
            for i in range(n):
                if t == 1:
                    hidden = inp
                else:
                    hidden = w[f"features.{idx}.hidden"]
                features.append(InvertedResidual(inp, hidden, oup, s if i == 0 else 1, expand=t != 1))
                inp = oup
                idx += 1
        features.append(conv_bn_act(inp, w["last"], kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(w["last"], num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def width_spec(self) -> "OrderedDict[str, int]":
        wm, rn = self.width_mult, self.round_nearest
        spec: OrderedDict[str, int] = OrderedDict()
        inp = make_divisible(32 * wm, rn)
        spec["stem"] = inp
        idx = 1
        for j, (t, c, n, _s) in enumerate(self.SETTINGS):
            oup = make_divisible(c * wm, rn)
            spec[f"stage{j}.out"] = oup
            for _ in range(n):
                if t != 1:
                    spec[f"features.{idx}.hidden"] = int(round(inp * t))
                inp = oup
                idx += 1
        spec["last"] = make_divisible(1280 * max(1.0, wm), rn)
        return spec

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(**kw) -> MobileNetV2:
    return MobileNetV2(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenetv2": mobilenet_v2,
}


# --------------------------------------------------------------------------
# initialisation / export
# --------------------------------------------------------------------------
@torch.no_grad()
def randomize_bn(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial affine params and running stats, so
    that BN folding / BN-based importance actually has something to do."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.empty(n).uniform_(0.5, 1.0, generator=generator))
            m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=generator))
            m.num_batches_tracked.fill_(1000)
    return model


def build_model(name: str, seed: int = 0, **kw) -> nn.Module:
    """Seeded random init + randomized BN stats, eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name](**kw)
    g = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, g)
    return model.eval()


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch: int = 1, image_size: int = 224,
                opset_version: int = 17, fold_bn: bool = True) -> str:
    """TorchScript-exporter ONNX export with a dynamic batch axis.

    fold_bn=True is the exporter's default behaviour in eval mode (BN folded
    into the preceding Conv); fold_bn=False keeps BatchNormalization nodes
    (TrainingMode.PRESERVE on an eval() model).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model = model.eval()
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    training = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    with torch.no_grad(), warnings.catch_warnings():
        # legacy-exporter deprecation notice; constant-folding advice that only
        # applies to models in training mode (ours is eval()).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*constant folding.*", category=UserWarning)
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=False,
            opset_version=opset_version,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
            training=training,
        )
    return path


def export_resnet50(path: str | os.PathLike, *, seed: int = 0, fold_bn: bool = True) -> str:
    """ResNet-50 (torchvision layout), seed-0 random weights with randomized BN
    stats, eval mode, TorchScript exporter, opset 17, dynamic batch."""
    return export_onnx(build_model("resnet50", seed=seed), path, fold_bn=fold_bn)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-resnet50", metavar="PATH", help="export ResNet-50 to PATH")
    ap.add_argument("--keep-bn", action="store_true", help="keep BatchNormalization nodes (no folding)")
    ap.add_argument("--summary", action="store_true", help="print width specs / param counts")
    args = ap.parse_args(argv)
    if args.summary or not args.export_resnet50:
        for name, ctor in MODELS.items():
            m = ctor()
            print(f"{name:12s} params={count_params(m):>10,d} widths={len(m.widths)}")
    if args.export_resnet50:
        p = export_resnet50(args.export_resnet50, fold_bn=not args.keep_bn)
        print(f"wrote {p} ({os.path.getsize(p) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
