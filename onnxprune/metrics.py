"""Parameters and multiply-accumulates, counted from the graph for one sample.

Symbolic dimensions (the batch) count as 1. Only Conv, ConvTranspose, Gemm and
MatMul are counted: they are where the MACs are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass
class Cost:
    params: int = 0
    macs: int = 0


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return [int(d) for d in value.const_value.shape]
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input() \
        and value.const_value.dtype.is_floating_point()


def node_costs(model: ir.Model) -> dict[str, Cost]:
    costs: dict[str, Cost] = {}
    for node in model.graph:
        params = sum(int(np.prod(v.const_value.shape)) for v in node.inputs if _is_weight(v))
        costs[node.name] = Cost(params, _macs(node))
    return costs


def _macs(node: ir.Node) -> int:
    op = node.op_type
    try:
        if op == "Conv":
            out, w = _dims(node.outputs[0]), _dims(node.inputs[1])
            if out is None or w is None:
                return 0
            return int(np.prod(out[1:])) * int(np.prod(w[1:]))
        if op == "ConvTranspose":
            x, w = _dims(node.inputs[0]), _dims(node.inputs[1])
            if x is None or w is None:
                return 0
            return int(np.prod(x[1:])) * int(np.prod(w[1:]))
        if op in ("Gemm", "MatMul"):
            a, b = _dims(node.inputs[0]), _dims(node.inputs[1])
            out = _dims(node.outputs[0])
            if a is None or b is None:
                return 0
            k = a[0] if (op == "Gemm" and node.attributes.get("transA") is not None
                         and node.attributes["transA"].value) else a[-1]
            n = out[-1] if out else b[-1]
            rows = int(np.prod(out[:-1])) if out else int(np.prod(a[:-1]))
            return rows * k * n
    except (TypeError, ValueError, IndexError):
        return 0
    return 0


def total_params(model: ir.Model) -> int:
    """Weights counted once each, however many nodes share them."""
    seen: set[int] = set()
    total = 0
    for node in model.graph:
        for v in node.inputs:
            if _is_weight(v) and id(v) not in seen:
                seen.add(id(v))
                total += int(np.prod(v.const_value.shape))
    return total


def total_macs(model: ir.Model) -> int:
    return sum(_macs(node) for node in model.graph)
