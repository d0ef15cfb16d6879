"""Stripe-wise pruning (SWP): Meng et al., "Pruning Filter in Filter", NeurIPS 2020.

Training. `FilterSkeleton(model)` wraps every plain `nn.Conv2d` with `groups == 1` in a
`SkeletonConv2d` that owns a learnable filter skeleton FS of shape N × kh × kw (N output
channels), initialised to ones, and computes `conv(x, W ⊙ FS[:, None])`. Grouped and
depthwise convolutions are left alone (listed in `skipped`, with a warning): a stripe
of theirs would span C/g channels and the paper does not prune them. The skeleton's
parameters are ordinary parameters of the model, so `model.parameters()` gives them to
the optimizer. Each training step::

    loss.backward()
    fs.after_backward()     # grad(FS) += alpha * sign(FS)   (the L1 penalty on FS);
                            # dead entries get zero gradient
    optimizer.step()
    fs.after_step()         # |FS| <= delta -> 0, with its gradient; dead for good

`FilterSkeleton(..., hook=True)` adds the alpha·sign(FS) term with a gradient hook
instead (then `after_backward` only masks the dead entries).

Export. `fold()` multiplies FS into W and puts the plain convolutions back; `export()`
folds a copy, exports it with the TorchScript exporter (opset 17, BatchNorm kept
unfused, parameter names kept as initializer names, dynamic batch), and then runs the
ONNX stripe surgery of `onnxprune.stripes`: dead filters are removed as channels
(with what reads them), dead border rows and columns of kernels are cut, and each
conv then runs dense with its remaining dead stripes as zeros, or, where it measured
faster in onnxruntime (65%+ dead stripes with 128+ input channels, 75%+ with 64+, 85%+
with 32+, on convs of 4 M MACs or more), in the paper's stripe form. It
returns the `StripeReport` (stripe sparsity, parameters and MACs counted by live
stripes next to the dense counts).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from onnxprune.stripes import (
    STRIPE_FORM_MIN_MACS,
    STRIPE_FORM_RULES,
    StripeReport,
    prune_stripes_file,
)


class SkeletonConv2d(nn.Module):
    """A Conv2d whose filters are scaled stripe by stripe: W ⊙ FS[:, None]."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        n, _, kh, kw = conv.weight.shape
        self.fs = nn.Parameter(torch.ones(n, kh, kw, dtype=conv.weight.dtype,
                                          device=conv.weight.device))
        # Stripes switched off for good (not saved: after_step rebuilds it from FS == 0).
        self.register_buffer("alive", torch.ones(n, kh, kw, dtype=torch.bool,
                                                 device=conv.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, self.conv.weight * self.fs[:, None], self.conv.bias)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        """The plain conv with W ← W ⊙ FS (this module's conv, modified in place)."""
        self.conv.weight.mul_(self.fs[:, None])
        return self.conv

    def extra_repr(self) -> str:
        dead = int((~self.alive).sum())
        return f"dead stripes {dead}/{self.alive.numel()}"


def _is_plain_conv2d(module: nn.Module) -> bool:
    # Subclasses that change forward (QAT fake-quant convs...) would lose their behaviour.
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward \
        and type(module)._conv_forward is nn.Conv2d._conv_forward


def _replace_children(model: nn.Module, replace: dict[int, nn.Module]) -> nn.Module:
    """Swap every reference to a module in `replace` (by id) for its replacement.

    A module used at several places (shared weights) is swapped at all of them.
    Returns the new root (the root itself may be replaced)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replace:
                setattr(parent, name, replace[id(child)])
    return replace.get(id(model), model)


def fold_skeletons(model: nn.Module) -> nn.Module:
    """Fold every SkeletonConv2d of `model` into its conv (in place); returns the plain model."""
    wrappers = {id(m): m for m in model.modules() if isinstance(m, SkeletonConv2d)}
    replace = {key: wrapper.folded() for key, wrapper in wrappers.items()}
    return _replace_children(model, replace)


class FilterSkeleton:
    """Wraps a model's convolutions with learnable filter skeletons (in place).

    `alpha` weighs the L1 penalty on FS (its subgradient alpha·sign(FS) is added to the
    gradient); entries with |FS| <= `delta` are switched off after each step. `exclude`
    lists module names (as in `named_modules()`) to leave unwrapped.
    """

    def __init__(self, model: nn.Module, alpha: float = 1e-5, delta: float = 0.01, *,
                 hook: bool = False, exclude: Iterable[str] = ()):
        self.alpha = float(alpha)
        self.delta = float(delta)
        self.hook = hook
        self.skipped: dict[str, str] = {}
        self.folded = False
        exclude = set(exclude)
        wrappers: dict[int, SkeletonConv2d] = {}
        self.layers: dict[str, SkeletonConv2d] = {}
        for name, module in model.named_modules():
            if isinstance(module, SkeletonConv2d):
                raise ValueError(f"'{name}' already has a filter skeleton")
            if not isinstance(module, nn.Conv2d) or id(module) in wrappers:
                continue
            if name in exclude:
                self.skipped[name] = "excluded"
            elif not _is_plain_conv2d(module):
                self.skipped[name] = f"{type(module).__name__} is not a plain Conv2d"
            elif module.groups != 1:
                kind = "depthwise" if module.groups == module.in_channels else "grouped"
                self.skipped[name] = f"{kind} convolution (groups={module.groups}): left dense"
            else:
                wrappers[id(module)] = self.layers[name] = SkeletonConv2d(module)
        self.model = _replace_children(model, wrappers)
        if hook:
            for layer in self.layers.values():
                fs = layer.fs
                fs.register_hook(lambda grad, fs=fs: grad + self.alpha * torch.sign(fs.detach()))
        grouped = [n for n, r in self.skipped.items() if "groups=" in r]
        if grouped:
            warnings.warn(f"SWP leaves grouped/depthwise convolutions dense: {', '.join(grouped)}",
                          stacklevel=2)

    # -- training
    def parameters(self) -> Iterator[nn.Parameter]:
        """The skeletons (they are also parameters of the model)."""
        return (layer.fs for layer in self.layers.values())

    @torch.no_grad()
    def after_backward(self) -> None:
        """grad(FS) += alpha·sign(FS) (unless hook=True); dead entries get no gradient."""
        for layer in self.layers.values():
            fs = layer.fs
            if fs.grad is None:
                fs.grad = torch.zeros_like(fs)
            if not self.hook:
                fs.grad.add_(torch.sign(fs), alpha=self.alpha)
            fs.grad.masked_fill_(~layer.alive, 0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Switch off the entries with |FS| <= delta, for good: FS and its gradient zeroed."""
        for layer in self.layers.values():
            fs = layer.fs
            layer.alive &= fs.abs() > self.delta
            fs.masked_fill_(~layer.alive, 0)
            if fs.grad is not None:
                fs.grad.masked_fill_(~layer.alive, 0)

    # -- inspection
    def stripe_counts(self) -> dict[str, tuple[int, int]]:
        """Per wrapped layer: (dead stripes, stripes)."""
        return {name: (int((layer.fs.detach() == 0).sum()), layer.fs.numel())
                for name, layer in self.layers.items()}

    def sparsity(self) -> float:
        """Fraction of the wrapped layers' stripes that are dead (FS == 0)."""
        counts = self.stripe_counts().values()
        total = sum(t for _, t in counts)
        return sum(d for d, _ in counts) / total if total else 0.0

    def dead_filters(self) -> dict[str, list[int]]:
        """Per wrapped layer: the filters with no live stripe."""
        return {name: torch.nonzero((layer.fs.detach() == 0).flatten(1).all(1)).flatten().tolist()
                for name, layer in self.layers.items()}

    # -- after training
    def fold(self, inplace: bool = True) -> nn.Module:
        """W ← W ⊙ FS and unwrap: a plain torch model. In place (this skeleton is then
        spent) unless `inplace=False`, which folds a copy and leaves training going."""
        if not inplace:
            return fold_skeletons(copy.deepcopy(self.model))
        if self.folded:
            return self.model
        self.model = fold_skeletons(self.model)
        self.layers = {}
        self.folded = True
        return self.model

    def export(self, example_input, path: str | Path, **kwargs) -> StripeReport:
        return export(self, example_input, path, **kwargs)


def _export_onnx(model: nn.Module, example_input, path: Path) -> None:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, inputs, str(path), dynamo=False, opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=names, output_names=["output"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "output"]})


def export(model_or_skeleton: nn.Module | FilterSkeleton, example_input, path: str | Path, *,
           form: str = "auto", rules=STRIPE_FORM_RULES, min_macs: int = STRIPE_FORM_MIN_MACS,
           round_to: int = 8,
           verify: bool = True, remove_filters: bool = True,
           shrink_kernels: bool = True) -> StripeReport:
    """Fold, export to ONNX and remove what the dead stripes allow; returns the report.

    The given model (or skeleton) is not modified: a folded copy is exported, in eval
    mode. `form`: "auto" (default) runs a conv (group 1, stride 1) in SWP's stripe form
    where that measured faster in onnxruntime (`rules`: at least 65% of its stripes dead
    with 128+ input channels, 75% with 64+, 85% with 32+; and `min_macs`, 4 M dense MACs
    per sample), and dense with zero stripes otherwise; "dense" and "stripe" force one form. Dead filters are removed down to
    channel counts that stay multiples of `round_to` (default 8: unaligned counts cost
    onnxruntime more than the filters save; 1 removes every removable dead filter). `verify` checks the result against the plain export with onnxruntime
    (nothing is written if they differ).
    """
    if isinstance(model_or_skeleton, FilterSkeleton):
        model = model_or_skeleton.fold(inplace=False)
    else:
        model = fold_skeletons(copy.deepcopy(model_or_skeleton))
    model.eval()
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".onnxprune-swp-", dir=path.resolve().parent) as tmp:
        raw = Path(tmp) / "folded.onnx"
        _export_onnx(model, example_input, raw)
        return prune_stripes_file(raw, path, verify=verify, remove_filters=remove_filters,
                                  shrink=shrink_kernels, form=form, rules=rules,
                                  min_macs=min_macs, round_to=round_to)


__all__ = ["FilterSkeleton", "SkeletonConv2d", "export", "fold_skeletons"]
