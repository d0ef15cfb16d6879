"""Map onnxprune's channel groups onto a live torch model.

The model is exported with the TorchScript exporter in `TrainingMode.PRESERVE` and
without constant folding: BatchNorm stays unfused and every initializer keeps its
`state_dict` name. onnxprune analyzes that graph; each slice the surgery would make
(producer filters, biases, BN parameters, consumers' input slices) names a torch
parameter or buffer, so a selection becomes masks on the live tensors.

(The dynamo exporter also keeps parameter names, but its optimizer fuses BN into
the convolutions; the TorchScript exporter is the one the adapters use.)
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from onnxprune.analyze import Analysis, analyze
from onnxprune.load import ORIGIN_PERM, load_normalized, origin, origin_axis
from onnxprune.plan import Selection, removed_roots


def export_preserving_names(model: torch.nn.Module, example_input, path: str | Path) -> Path:
    """ONNX export that keeps BN unfused and parameter names as initializer names."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    names = [f"input{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, tuple(t.to(device) for t in inputs), str(path), dynamo=False,
                opset_version=17, training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False, input_names=names, output_names=["output"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "output"]})
    finally:
        model.train(was_training)
    return Path(path)


@torch.no_grad()
def _export_structure(model: torch.nn.Module, example_input, path: Path) -> Path:
    """Export for the mapping with every float tensor temporarily made unique: the
    exporter shares byte-identical initializers (a fresh model's BN γ = 1, β = 0 and
    running statistics), which would map several torch tensors to one name."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.copy_(torch.rand(tensor.shape, generator=generator).to(tensor) + 0.5)
    try:
        return export_preserving_names(model, example_input, path)
    finally:
        model.load_state_dict(saved)


class TorchGroups:
    """onnxprune's groups of a torch model, and the torch tensors each slice touches."""

    def __init__(self, model: torch.nn.Module, example_input, exclude: Iterable[str] = ()):
        self.model = model
        self.example_input = example_input
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxprune-torch-")
        self.onnx_path = _export_structure(model, example_input,
                                           Path(self._tmp.name) / "model.onnx")
        self.exclude = list(exclude)
        self.analysis: Analysis = analyze(load_normalized(self.onnx_path), self.exclude)
        self.tensors: dict[str, torch.Tensor] = {**dict(model.named_parameters()),
                                                 **dict(model.named_buffers())}
        # (torch name, axis, channel ids) for every slice of a torch tensor.
        self.sites = [(origin(v), origin_axis(v, s.axis), s.ids, s.role)
                      for s in self.analysis.slices
                      for v in [s.node.inputs[s.input]] if origin(v) in self.tensors]
        self.producer_weights = {p.node.name: origin(p.node.inputs[p.weight])
                                 for p in self.analysis.producers}
        self._producer_biases = {origin(p.node.inputs[2]) for p in self.analysis.producers
                                 if p.node.op_type in ("Conv", "ConvTranspose", "Gemm")
                                 and len(p.node.inputs) > 2 and p.node.inputs[2] is not None}

    @property
    def prunable(self):
        return [g for g in self.analysis.groups if g.prunable]

    def sync(self) -> None:
        """Copy the live torch values into the analysis' ONNX constants, so onnxprune's
        scorers see the current weights."""
        seen = set()
        for site in self.analysis.slices:
            value = site.node.inputs[site.input]
            name = origin(value)
            if name in self.tensors and id(value) not in seen:
                seen.add(id(value))
                array = self.tensors[name].detach().cpu().numpy()
                perm = value.meta.get(ORIGIN_PERM)
                if perm is not None:  # a transposed copy of the parameter
                    array = np.transpose(array, perm)
                value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)

    def masks(self, selection: Selection, members: bool = True
              ) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """For each torch tensor: (axis, removed positions) pairs.

        `members=True`: every coupled parameter (filters, biases, BN γ and β, consumers'
        input slices): the model then computes exactly what the hard-pruned one does
        (running statistics need no mask: γ = β = 0 silences a channel).
        `members=False`: the producers' filters and their biases only (soft pruning's
        "set the pruned filters to zero", which keeps them trainable)."""
        alive = self.analysis.alive(removed_roots(self.analysis, selection))
        out: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, axis, ids, role in self.sites:
            if not isinstance(self.tensors[name], torch.nn.Parameter):
                continue
            if not members and role != "producer" and name not in self._producer_biases:
                continue
            removed = np.flatnonzero(~alive(ids))
            if len(removed):
                index = torch.as_tensor(removed, device=self.tensors[name].device)
                out.setdefault(name, []).append((axis, index))
        return out

    @torch.no_grad()
    def zero(self, masks: dict[str, list[tuple[int, torch.Tensor]]], grads: bool = False) -> None:
        """Zero the masked entries of the tensors (or of their gradients)."""
        for name, entries in masks.items():
            tensor = self.tensors[name]
            target = tensor.grad if grads else tensor
            if target is None:
                continue
            for axis, index in entries:
                target.index_fill_(axis, index, 0.0)

    @torch.no_grad()
    def reset_statistics(self, selection: Selection) -> None:
        """Running mean 0 and variance 1 for the BatchNorm channels of removed channels:
        the statistics of a zeroed filter's output. In eval mode the channel then emits
        what it emits in training mode (BN's β), instead of an offset learnt while the
        filter was alive."""
        alive = self.analysis.alive(removed_roots(self.analysis, selection))
        for site in self.analysis.slices:
            if site.node.op_type != "BatchNormalization" or site.input not in (3, 4):
                continue
            name = origin(site.node.inputs[site.input])
            removed = np.flatnonzero(~alive(site.ids))
            if name in self.tensors and len(removed):
                index = torch.as_tensor(removed, device=self.tensors[name].device)
                self.tensors[name].index_fill_(0, index, 0.0 if site.input == 3 else 1.0)

    def selection_document(self, selection: Selection) -> dict:
        """The selection as plan-file groups (producer node + output channels), which
        `onnxprune.plan.selection_from_plan` maps onto another export of the model."""
        from onnxprune.plan import _producer_channels

        return {"groups": [{"producers": _producer_channels(self.analysis, g,
                                                            selection.get(g.index, []))}
                           for g in self.analysis.groups if g.index in selection]}

    def export_pruned(self, path: str | Path, selection: Selection) -> Path:
        """Export the (masked) model and hard-prune the selection with onnxprune surgery."""
        from onnxprune.apply import apply
        from onnxprune.load import save_model
        from onnxprune.plan import selection_from_plan

        with tempfile.TemporaryDirectory(prefix="onnxprune-torch-") as tmp:
            source = export_preserving_names(self.model, self.example_input,
                                             Path(tmp) / "model.onnx")
            fresh = analyze(load_normalized(source), self.exclude)
            mapped = selection_from_plan(fresh, self.selection_document(selection))
            surgery = apply(fresh, mapped)
            save_model(surgery.model, path)
        return Path(path)
