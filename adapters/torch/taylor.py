"""Taylor importance in PyTorch (Molchanov et al., CVPR 2019).

`TaylorCollector` records the gradients that `onnxprune --method taylor --grads` reads;
`TaylorPruner` runs the paper's iterative schedule during training.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from onnxprune.criteria import as_filters, following_batchnorm
from onnxprune.load import origin
from onnxprune.plan import MacsModel, Selection, _cap

from .mapping import TorchGroups


def _tracked(groups: TorchGroups) -> dict[str, int]:
    """ONNX-named weights of the producers, and γ/β of a BN right after one: name → the
    axis of output channels."""
    names: dict[str, int] = {}
    for p in groups.analysis.producers:
        names[origin(p.node.inputs[p.weight])] = p.axis
        bn = following_batchnorm(p)
        if bn is not None:
            for index in (1, 2):
                names[origin(bn.inputs[index])] = 0
    return {n: a for n, a in names.items() if n in groups.tensors
            and isinstance(groups.tensors[n], torch.nn.Parameter)}


class TaylorCollector:
    """Collect dL/dW per minibatch for every ONNX-named weight (and BN γ, β).

    Call `step()` after each backward pass; `write(path)` writes the grads.npz that
    `onnxprune --method taylor|taylor-sq|taylor-bn --grads` reads.

    `bounded=True` keeps memory at O(channels) per layer instead of one full gradient per
    minibatch: it accumulates the per-channel contributions Σ_s w_s·g_s and
    Σ_s (w_s·g_s)² of each minibatch (what `scores()` needs exactly), and the running
    mean gradient; `write()` then stores that mean gradient (weight-shaped), on which
    the file's criteria are the average-gradient approximation.
    """

    def __init__(self, model: torch.nn.Module, example_input, bounded: bool = False):
        self.groups = TorchGroups(model, example_input)
        self.names = _tracked(self.groups)
        self.bounded = bounded
        self.batches: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.mean: dict[str, np.ndarray] = {}
        self.sums: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.squares: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.count = 0

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        for name, axis in self.names.items():
            tensor = self.groups.tensors[name]
            if tensor.grad is None:
                continue
            grad = tensor.grad.detach().double().cpu().numpy()
            if not self.bounded:
                self.batches[name].append(grad.copy())
                continue
            prev = self.mean.get(name, np.zeros_like(grad))
            self.mean[name] = prev + (grad - prev) / self.count
            w = as_filters(tensor.detach().double().cpu().numpy(), axis)
            g = as_filters(grad, axis)
            self.sums[name].append((w * g).sum(axis=1))
            self.squares[name].append(((w * g) ** 2).sum(axis=1))

    def gradients(self) -> dict[str, np.ndarray]:
        if self.bounded:
            return dict(self.mean)
        return {n: np.stack(b) for n, b in self.batches.items() if b}

    def write(self, path: str | Path) -> Path:
        np.savez(path, **{n: g.astype(np.float32) for n, g in self.gradients().items()})
        return Path(path)

    def scores(self, name: str, squared: bool = False) -> np.ndarray:
        """The exact per-minibatch Taylor criterion of one weight, averaged."""
        if self.bounded:
            per = self.squares[name] if squared else [s ** 2 for s in self.sums[name]]
            return np.mean(per, axis=0)
        axis = self.names[name]
        w = as_filters(self.groups.tensors[name].detach().double().cpu().numpy(), axis)
        per = [((w * as_filters(g, axis)) ** 2).sum(axis=1) if squared
               else (w * as_filters(g, axis)).sum(axis=1) ** 2 for g in self.batches[name]]
        return np.mean(per, axis=0)


class TaylorPruner:
    """The paper's iterative schedule: every `frequency` minibatches, `n` more channels
    go, ranked globally by the Taylor criterion averaged since the last pruning step and
    smoothed with `momentum` across steps; pruned channels stay masked while training
    continues; it stops at `target_channels` removed or at `target_macs` (a fraction).

    `round_to` > 1 keeps each group's kept count a multiple of it (the paper removes
    channels one by one; unaligned counts can make the pruned model slower than the
    original on onnxruntime CPU, see benchmarks/RESULTS.md): after each pruning step,
    every group it touched loses its next lowest-ranked channels down to the multiple,
    so a step may remove a few more than `n`, and the last one may pass the target.

    Call `step()` after each `loss.backward()` and before `optimizer.step()`, then
    `after_optimizer_step()`.
    """

    def __init__(self, model: torch.nn.Module, example_input, *, n: int = 100,
                 frequency: int = 30, momentum: float = 0.9, target_channels: int | None = None,
                 target_macs: float | None = None, criterion: str = "taylor",
                 max_layer_ratio: float = 0.9, round_to: int = 1,
                 exclude: Iterable[str] = ()):
        if target_channels is None and target_macs is None:
            raise ValueError("give target_channels or target_macs")
        self.groups = TorchGroups(model, example_input, exclude)
        self.n, self.frequency, self.momentum = n, frequency, momentum
        self.target_channels, self.target_macs = target_channels, target_macs
        self.criterion, self.max_layer_ratio = criterion, max_layer_ratio
        self.round_to = max(1, round_to)
        a = self.groups.analysis
        self.macs = MacsModel(a)
        self._position = {int(r): (g.index, k) for g in self.groups.prunable
                          for k, r in enumerate(g.classes)}
        self.importance: dict[int, np.ndarray] = {}
        self._running: dict[int, np.ndarray] = {g.index: np.zeros(g.channels)
                                                for g in self.groups.prunable}
        self._batches = 0
        self.selection: dict[int, list[int]] = {}
        self._masks: dict = {}
        self.done = False

    def _batch_scores(self) -> dict[int, np.ndarray]:
        """Per group: the criterion of this minibatch, each producer normalized by its L2
        norm (the paper's layer-wise normalization), averaged over coupled producers."""
        out = {}
        for g in self.groups.prunable:
            total = np.zeros(g.channels)
            count = np.zeros(g.channels)
            position = {int(r): k for k, r in enumerate(g.classes)}
            for p in g.producers:
                name = origin(p.node.inputs[p.weight])
                tensor = self.groups.tensors.get(name)
                if tensor is None or tensor.grad is None:
                    continue
                w = as_filters(tensor.detach().double().cpu().numpy(), p.axis)
                grad = as_filters(tensor.grad.detach().double().cpu().numpy(), p.axis)
                s = ((w * grad) ** 2).sum(axis=1) if self.criterion == "taylor-sq" \
                    else (w * grad).sum(axis=1) ** 2
                s = s / (np.linalg.norm(s) or 1.0)
                for root, value in zip(self.groups.analysis.roots[p.ids], s):
                    total[position[int(root)]] += value
                    count[position[int(root)]] += 1
            out[g.index] = total / np.maximum(count, 1)
        return out

    def step(self) -> bool:
        """Accumulate this minibatch; every `frequency` batches prune. True if it pruned."""
        if self.done:
            return False
        for index, s in self._batch_scores().items():
            self._running[index] += s
        self._batches += 1
        if self._batches % self.frequency:
            return False
        for index, running in self._running.items():
            averaged = running / self.frequency
            previous = self.importance.get(index)
            self.importance[index] = averaged if previous is None else \
                self.momentum * previous + (1 - self.momentum) * averaged
            self._running[index] = np.zeros_like(running)
        self._prune_more()
        return True

    def _removed(self) -> int:
        return sum(len(v) for v in self.selection.values())

    def _reached(self) -> bool:
        if self.target_channels is not None and self._removed() >= self.target_channels:
            return True
        return self.target_macs is not None and self.macs.total <= \
            self.target_macs * self.macs.total0

    def _prune_more(self) -> None:
        groups = {g.index: g for g in self.groups.prunable}
        ranked = sorted((float(s), g, k) for g, values in self.importance.items()
                        for k, s in enumerate(values) if k not in self.selection.get(g, []))
        taken = 0
        touched = set()
        for _, g, k in ranked:
            if taken >= self.n or self._reached():
                break
            if len(self.selection.get(g, [])) >= _cap(groups[g], self.max_layer_ratio):
                continue
            self._remove(groups[g], k)
            touched.add(g)
            taken += 1
        for _, g, k in ranked:  # align the kept counts of the groups this step touched
            group = groups[g]
            removed = self.selection.get(g, [])
            if g in touched and k not in removed and \
                    (group.channels - len(removed)) % self.round_to and \
                    len(removed) < _cap(group, self.max_layer_ratio):
                self._remove(group, k)
        self.done = self._reached() or taken == 0
        self._masks = self.groups.masks(self.current_selection())
        self.groups.zero(self._masks)

    def _remove(self, group, k: int) -> None:
        self.selection.setdefault(group.index, []).append(k)
        self.macs.remove(int(group.classes[k]))

    def current_selection(self) -> Selection:
        return {g: np.array(sorted(v), dtype=np.int64) for g, v in self.selection.items() if v}

    def after_optimizer_step(self) -> None:
        """Keep pruned channels at zero while training continues."""
        self.groups.zero(self._masks)

    def export(self, path: str | Path) -> Path:
        self.groups.zero(self._masks)
        return self.groups.export_pruned(path, self.current_selection())
