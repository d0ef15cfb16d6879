"""Soft filter pruning during training: SFP, ASFP and FPGM's training procedure.

- SFP (He et al., IJCAI 2018): at the start and after every epoch, the filters (and
  biases) of the lowest-ranked channels of each group are zeroed. Zeroed filters stay
  trainable, with no gradient masking: they may recover and be chosen again later.
  (Zeroing every coupled member during training as well — BN γ and β, consumers'
  input slices — would cut every gradient path to the channel and forbid recovery, so
  that happens once, at `export()`: the masked model then equals the pruned export.)
- FPGM's official training additionally zeroes the gradients of the currently pruned
  filters every iteration: `grad_mask=True`.
- ASFP (He et al., 2019): the rate grows during training,
  P(t) = P·(1 − e^{−kt}) / (1 − e^{−k·t_max}), with k chosen so that P(D·t_max) = 3P/4
  (D = 1/8 by default); t counts epochs.

Scores come from onnxprune's own scorers on the live weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from scipy.optimize import brentq

from onnxprune import score, select
from onnxprune.plan import Selection

from .mapping import TorchGroups


def asfp_k(t_max: float, d: float = 1 / 8) -> float:
    """The k for which P(D·t_max) = 3/4·P."""
    def gap(k: float) -> float:
        return (1 - math.exp(-k * d * t_max)) / (1 - math.exp(-k * t_max)) - 0.75
    return brentq(gap, 1e-9, 1e3 / max(t_max, 1e-9))


def asfp_rate(epoch: float, ratio: float, t_max: float, d: float = 1 / 8) -> float:
    if epoch <= 0:
        return 0.0
    k = asfp_k(t_max, d)
    return ratio * (1 - math.exp(-k * epoch)) / (1 - math.exp(-k * t_max))


class SoftFilterPruner:
    """Zero the lowest-ranked channels of every group at each `step(epoch)`.

    Call `step(0)` before training and `step(epoch)` after each epoch; with
    `grad_mask=True` also call `mask_gradients()` after each backward pass, then
    `export(path)` for the hard-pruned ONNX model.

    A step zeroes filters the network may be using, which leaves every downstream
    BatchNorm's running statistics stale: before evaluating or exporting after a step,
    recompute them with `recalibrate_batchnorm(model, training_batches)`.
    """

    def __init__(self, model: torch.nn.Module, example_input, method: str = "l2",
                 ratio: float = 0.4, schedule: str = "constant", epochs: int | None = None,
                 d: float = 1 / 8, grad_mask: bool = False, round_to: int = 1,
                 exclude: Iterable[str] = (), **score_options):
        if schedule not in ("constant", "asymptotic"):
            raise ValueError("schedule must be 'constant' or 'asymptotic'")
        if schedule == "asymptotic" and not epochs:
            raise ValueError("the asymptotic schedule needs epochs (t_max)")
        self.groups = TorchGroups(model, example_input, exclude)
        self.method, self.ratio, self.schedule = method, ratio, schedule
        self.epochs, self.d, self.grad_mask, self.round_to = epochs, d, grad_mask, round_to
        self.score_options = score_options
        self.selection: Selection = {}
        self._masks: dict = {}

    def rate(self, epoch: float) -> float:
        if self.schedule == "constant":
            return self.ratio
        return asfp_rate(epoch, self.ratio, self.epochs, self.d)

    def step(self, epoch: float = 0) -> Selection:
        """Re-rank on the live weights and zero the current lowest-ranked channels."""
        self.groups.sync()
        a = self.groups.analysis
        scores = score(a, self.method, groups=self.groups.prunable, **self.score_options)
        rate = min(self.rate(epoch), 0.999)
        self.selection = select(a, scores, rate, self.round_to)
        self._masks = self.groups.masks(self.selection, members=False)
        self.groups.zero(self._masks)
        self.groups.reset_statistics(self.selection)
        return self.selection

    def mask_gradients(self) -> None:
        """FPGM's official training: pruned filters get no update."""
        if self.grad_mask:
            self.groups.zero(self._masks, grads=True)

    def reapply(self) -> None:
        """Zero the current selection again (e.g. after an optimizer step with momentum)."""
        self.groups.zero(self._masks)

    def pruned_channels(self) -> int:
        return sum(len(p) for p in self.selection.values())

    @torch.no_grad()
    def _compensate(self, example_input) -> int:
        """Fold into the readers' biases what the zeroed filters still emitted.

        A zeroed filter followed by BN emits BN's β, a constant the network learnt to use;
        removing the channel drops it. Each reading Conv/Linear gets bias += a_c·ΣW[:, c]
        for the constant a_c it read on channel c (measured on `example_input`). Exact for
        1×1 convolutions and linear layers; at a padded border of a larger kernel the
        true contribution is smaller. Returns how many readers were compensated."""
        model = self.groups.model
        removed = {}
        for name, entries in self.groups.masks(self.selection, members=True).items():
            module_name, _, leaf = name.rpartition(".")
            for axis, index in entries:
                if leaf == "weight" and axis == 1:
                    removed[module_name] = index
        modules = dict(model.named_modules())
        readers = {n: m for n, m in modules.items() if n in removed and isinstance(
            m, (torch.nn.Conv2d, torch.nn.Linear)) and getattr(m, "groups", 1) == 1}
        seen: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, n=n: seen.setdefault(n, args[0].detach()))
            for n, m in readers.items()]
        was_training = model.training
        model.eval()
        try:
            inputs = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*inputs)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        count = 0
        for n, module in readers.items():
            x = seen.get(n)
            if x is None:
                continue
            index = removed[n].to(x.device)
            axis = x.dim() - 1 if isinstance(module, torch.nn.Linear) else 1
            values = x.index_select(axis, index)
            constant = values.movedim(axis, 0).reshape(len(index), -1).mean(dim=1)
            weight = module.weight.index_select(1, index)
            delta = (weight.flatten(2).sum(dim=2) if weight.dim() > 2 else weight) @ constant
            if module.bias is None:
                module.bias = torch.nn.Parameter(torch.zeros_like(delta))
            module.bias += delta
            count += 1
        return count

    def masked_model(self, compensate: bool = True) -> torch.nn.Module:
        """Zero every coupled member of the pruned channels (BN γ and β, consumers' input
        slices): the model then computes exactly what the hard-pruned export computes.

        With `compensate`, the constants the zeroed filters still emitted (BN's β) are
        first folded into the readers' biases (see `_compensate`)."""
        if compensate and self.selection:
            self._compensate(self.groups.example_input)
        self.groups.zero(self.groups.masks(self.selection, members=True))
        return self.groups.model

    def export(self, path: str | Path, compensate: bool = True) -> Path:
        """Hard-prune the current selection with onnxprune surgery into an ONNX model
        (after `masked_model()`, which it calls)."""
        self.masked_model(compensate)
        return self.groups.export_pruned(path, self.selection)
