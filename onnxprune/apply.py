"""Graph surgery: carry out a selection with the records the op rules made.

Constants are sliced lazily (the slice is taken when the model is written), so
memory stays near the model's size. A constant shared by several nodes is sliced
once when every user needs the same slice, and un-shared (one copy per user)
otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .analyze.graph import Analysis
from .errors import UnsupportedModelError
from .load import (ORIGIN, clear_intermediate_shapes, copy_origin, infer_shapes, opset,
                   origin, origin_axis)
from .plan import Selection, removed_roots
from .score import release


@dataclass
class Surgery:
    model: ir.Model
    slices: list[dict] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)


def _take(array: np.ndarray, keeps: dict[int, np.ndarray]) -> np.ndarray:
    for axis, keep in sorted(keeps.items()):
        array = np.take(array, np.flatnonzero(keep), axis=axis)
    return array


_STREAM_BYTES = 1 << 20  # external tensors from this size are sliced while being written
_WINDOW_BYTES = 64 << 20  # source bytes read at a time when streaming


class _StreamedSlice(ir.LazyTensor):
    """A slice of an external tensor, written to the output file window by window.

    Reading the source with plain file reads (not a memory map) keeps resident memory
    at one window (~64 MB) however large the tensor is.
    """

    def __init__(self, source: ir.ExternalTensor, keeps: dict[int, np.ndarray], shape, name):
        self._source, self._keeps = source, keeps
        super().__init__(self._whole, dtype=source.dtype, shape=ir.Shape(shape), name=name)

    def _whole(self):
        sliced = _take(self._source.numpy(), self._keeps)
        release(self._source)
        return ir.tensor(sliced, dtype=self._source.dtype, name=self.name)

    def tofile(self, file) -> None:
        src = self._source
        shape = [int(d) for d in src.shape]
        dtype = src.dtype.numpy()
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        window = max(1, _WINDOW_BYTES // max(row_bytes, 1))
        keep0 = self._keeps.get(0, np.ones(shape[0], dtype=bool))
        rest = {a: k for a, k in self._keeps.items() if a != 0}
        path = Path(src.base_dir) / src.location
        with open(path, "rb") as handle:
            for r0 in range(0, shape[0], window):
                r1 = min(shape[0], r0 + window)
                rows = np.flatnonzero(keep0[r0:r1])
                if len(rows) == 0:
                    continue
                handle.seek((src.offset or 0) + r0 * row_bytes)
                block = np.frombuffer(handle.read((r1 - r0) * row_bytes), dtype=dtype)
                block = block.reshape([r1 - r0, *shape[1:]])[rows]
                file.write(np.ascontiguousarray(_take(block, rest)).tobytes())


def _sliced_tensor(source: ir.TensorProtocol, keeps: dict[int, np.ndarray], name: str):
    shape = list(source.shape)
    for axis, keep in keeps.items():
        shape[axis] = int(keep.sum())
    if isinstance(source, ir.ExternalTensor) and source.nbytes >= _STREAM_BYTES:
        return _StreamedSlice(source, keeps, shape, name)

    def compute():
        sliced = _take(source.numpy(), keeps)
        release(source)  # unmap the input's pages once copied out
        return ir.tensor(sliced, dtype=source.dtype, name=name)
    if source.nbytes < (1 << 20):
        return compute()
    return ir.LazyTensor(compute, dtype=source.dtype, shape=ir.Shape(shape), name=name)


def _new_initializer(graph: ir.Graph, like: ir.Value, tensor, name: str) -> ir.Value:
    unique, k = name, 1
    while unique in graph.initializers:
        unique, k = f"{name}_{k}", k + 1
    tensor.name = unique
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    copy_origin(value, like)
    graph.register_initializer(value)
    return value


def _replace_constant(graph: ir.Graph, value: ir.Value, per_use: dict[tuple[ir.Node, int], object],
                      make, force_copy: bool = False) -> dict[tuple[ir.Node, int], bool]:
    """Give each listed use its new tensor: in place if all uses agree, else one copy per use.

    `per_use` maps (node, input index) to a key; uses with equal keys get the same tensor.
    Returns, per use, whether it was un-shared.
    """
    uses = [(u.node, u.idx) for u in value.uses()]
    keys = {per_use.get(use, None) for use in uses}
    if len(keys) == 1 and None not in keys and not value.is_graph_output() and not force_copy:
        value.const_value = make(value.name)
        value.shape = ir.Shape(value.const_value.shape)
        return {use: False for use in per_use}
    for node, index in per_use:
        copy = _new_initializer(graph, value, make(f"{value.name}__{node.name}"),
                                f"{value.name}__{node.name}")
        node.replace_input_with(index, copy)
    return {use: True for use in per_use}


def _check_nonempty(analysis: Analysis, alive) -> None:
    for rewrite in analysis.split_rewrites:
        for part in rewrite.parts:
            if len(part) and not alive(part).any():
                raise UnsupportedModelError(
                    f"the plan empties an output of Split '{rewrite.node.name}'")
    for site in analysis.slices:
        if len(site.ids) and not alive(site.ids).any():
            raise UnsupportedModelError(
                f"the plan removes every channel read by '{site.node.name}'")


def apply(analysis: Analysis, selection: Selection) -> Surgery:
    """Remove the selected channels from `analysis.model` (modified in place)."""
    model = analysis.model
    graph = model.graph
    surgery = Surgery(model)
    alive = analysis.alive(removed_roots(analysis, selection))
    _check_nonempty(analysis, alive)

    # Constant slices, grouped per constant and per use.
    keeps: dict[ir.Value, dict[tuple[ir.Node, int], dict[int, np.ndarray]]] = defaultdict(dict)
    for site in analysis.slices:
        keep = alive(site.ids)
        if keep.all():
            continue
        value = site.node.inputs[site.input]
        per_axis = keeps[value].setdefault((site.node, site.input), {})
        if site.axis in per_axis and not np.array_equal(per_axis[site.axis], keep):
            raise UnsupportedModelError(f"conflicting slices of '{value.name}' at "
                                        f"'{site.node.name}' (internal error)")
        per_axis[site.axis] = keep
    for value, per_use in keeps.items():
        source = value.const_value
        keys = {use: tuple((a, k.tobytes()) for a, k in sorted(ax.items()))
                for use, ax in per_use.items()}
        first = next(iter(per_use.values()))
        if len(set(keys.values())) == 1:
            unshared = _replace_constant(graph, value, keys,
                                         lambda name, s=source, k=first: _sliced_tensor(s, k, name))
        else:
            unshared = {}
            for use, axes in per_use.items():
                unshared.update(_replace_constant(
                    graph, value, {use: keys[use]},
                    lambda name, s=source, axes=axes: _sliced_tensor(s, axes, name),
                    force_copy=True))
        recorded = set()
        for (node, index), axes in per_use.items():
            consumer = node.name if unshared[(node, index)] else None
            for axis, keep in sorted(axes.items()):
                entry = (consumer, axis)
                if entry in recorded:
                    continue
                recorded.add(entry)
                item = {"tensor": origin(value), "axis": origin_axis(value, int(axis)),
                        "removed": np.flatnonzero(~keep).tolist()}
                if consumer:
                    item["consumer"] = consumer
                surgery.slices.append(item)

    # Shape-like constants (Reshape shapes, Slice bounds, Resize sizes).
    for rewrite in analysis.const_rewrites:
        value = rewrite.node.inputs[rewrite.input]
        before = value.const_value.numpy()
        after = np.asarray(rewrite.compute(alive), dtype=before.dtype).reshape(before.shape)
        if np.array_equal(before, after):
            continue
        _replace_constant(graph, value, {(rewrite.node, rewrite.input): 0},
                          lambda name, after=after: ir.tensor(after, name=name))
        surgery.updates.append({"tensor": origin(value), "consumer": rewrite.node.name,
                                "before": before.tolist(), "after": after.tolist()})

    for rewrite in analysis.attr_rewrites:
        attr = rewrite.node.attributes.get(rewrite.name)
        before = attr.value if attr is not None else None
        after = rewrite.compute(alive)
        if before is not None and list(np.ravel(before)) == list(np.ravel(after)):
            continue
        kind = ir.AttributeType.INTS if isinstance(after, list) else ir.AttributeType.INT
        rewrite.node.attributes[rewrite.name] = ir.Attr(rewrite.name, kind, after)
        surgery.updates.append({"node": rewrite.node.name, "attribute": rewrite.name,
                                "before": _plain(before), "after": after})

    for rewrite in analysis.split_rewrites:
        _rewrite_split(model, rewrite, alive, surgery)

    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    clear_intermediate_shapes(model)
    infer_shapes(model)
    return surgery


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return value


def _rewrite_split(model: ir.Model, rewrite, alive, surgery: Surgery) -> None:
    node = rewrite.node
    sizes = [int(alive(part).sum()) for part in rewrite.parts]
    before = [len(part) for part in rewrite.parts]
    if sizes == before:
        return
    surgery.updates.append({"node": node.name, "attribute": "split", "before": before,
                            "after": sizes})
    if opset(model) < 13:
        node.attributes["split"] = ir.Attr("split", ir.AttributeType.INTS, sizes)
        return
    node.attributes.pop("num_outputs", None)
    array = np.array(sizes, dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        _replace_constant(model.graph, node.inputs[1], {(node, 1): 0},
                          lambda name: ir.tensor(array, name=name))
        return
    value = _new_initializer(model.graph, node.inputs[0], ir.tensor(array),
                             f"{node.name}__split")
    value.meta[ORIGIN] = value.name
    node.resize_inputs(2)
    node.replace_input_with(1, value)
