"""HGSR regularization (Mitsuno, Miyao and Kurita, ICPR 2020) and its pruning flow.

The loss term acts on feature-wise (input-channel) groups of every Conv except
projection shortcuts: λ Σ_i (Σ_o √‖W_{o,i}‖₁)² (the squared group L1/2 form, default)
or λ Σ_i (Σ_o ‖W_{o,i}‖₂)², with λ = 1e-3 by default.

Flow: train with `penalty()` added to the loss; then select channels with the
loss-based greedy selection (`prune_with_hgsr`, which runs onnxprune's `--method hgsr`
on the exported model); then retrain the pruned architecture: the paper retrains from
scratch (`OnnxModule` re-initialized), fine-tuning (`finetune`) is offered too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .mapping import TorchGroups


def projection_shortcuts(groups: TorchGroups) -> set[str]:
    """1×1 Conv producers that share a residual group with another producer, and read
    the same input as another Conv: the block's projection shortcut."""
    readers: dict[int, int] = {}
    for p in groups.analysis.producers:
        if p.node.op_type == "Conv":
            readers[id(p.node.inputs[0])] = readers.get(id(p.node.inputs[0]), 0) + 1
    names = set()
    for g in groups.analysis.groups:
        if len(g.producers) < 2:
            continue
        for p in g.producers:
            shape = p.node.inputs[p.weight].const_value.shape
            if p.node.op_type == "Conv" and all(int(d) == 1 for d in list(shape)[2:]) \
                    and readers.get(id(p.node.inputs[0]), 0) > 1:
                names.add(groups.producer_weights[p.node.name])
    return names


class HierarchicalGroupSparsity:
    """`loss = task_loss + reg.penalty()`."""

    def __init__(self, model: torch.nn.Module, example_input, lam: float = 1e-3,
                 form: str = "l1/2", exclude: Iterable[str] = ()):
        if form not in ("l1/2", "l2"):
            raise ValueError("form must be 'l1/2' or 'l2'")
        self.lam, self.form = lam, form
        groups = TorchGroups(model, example_input)
        skip = projection_shortcuts(groups) | set(exclude)
        self.weights = []
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d) and module.groups == 1:
                name = f"{module_name}.weight" if module_name else "weight"
                if name not in skip:
                    self.weights.append((name, module.weight))
        self.skipped = sorted(skip)

    def penalty(self) -> torch.Tensor:
        total = None
        for _, w in self.weights:
            per = w.flatten(2)                                   # [O, I, k·k]
            if self.form == "l1/2":
                inner = per.abs().sum(dim=2).clamp_min(1e-12).sqrt()   # √‖W_{o,i}‖₁
            else:
                inner = per.pow(2).sum(dim=2).clamp_min(1e-24).sqrt()  # ‖W_{o,i}‖₂
            term = inner.sum(dim=0).pow(2).sum()                 # Σ_i (Σ_o ·)²
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total


def prune_with_hgsr(model: torch.nn.Module, example_input, x: np.ndarray,
                    y: np.ndarray | None, out: str | Path, ratio: float = 0.4,
                    samples: int = 128, form: str = "l1/2", **options) -> dict:
    """Export the trained model and select channels with the loss-based greedy selection;
    returns onnxprune's report (the pruned ONNX model is at `out`)."""
    from onnxprune.pipeline import Options, prune

    from .mapping import export_preserving_names

    out = Path(out)
    source = out.with_name(out.stem + ".unpruned.onnx")
    export_preserving_names(model, example_input, source)
    data = out.with_name(out.stem + ".hgsr-data.npz")
    np.savez(data, **({"x": x, "y": y} if y is not None else {"x": x}))
    return prune(source, out, Options(method="hgsr", ratio=ratio, samples=samples,
                                      hgsr_form=form, data=str(data), round_to=1,
                                      **options))


def reinitialize(module, seed: int = 0):
    """Retrain the pruned architecture from scratch, as the paper does: fresh weights for
    an `OnnxModule` of the pruned model (Kaiming-normal filters, zero biases, unit
    normalization scales, fresh running statistics), keeping its shapes. Fine-tuning
    (`onnxprune finetune`) instead keeps the selected weights."""
    norm_scales = {n.inputs[1].name for n in module.model.graph
                   if n.op_type in ("BatchNormalization", "InstanceNormalization",
                                    "LayerNormalization") and len(n.inputs) > 1}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_onnx_parameters():
            if name in norm_scales:
                param.fill_(1.0)
            elif param.dim() >= 2:
                fan_in = param[0].numel() if param.dim() > 2 else param.shape[-1]
                std = (2.0 / max(fan_in, 1)) ** 0.5
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * std)
            else:
                param.zero_()
        for name, value in module.named_onnx_buffers():
            value.fill_(1.0) if "var" in name.lower() else value.zero_()
    return module
