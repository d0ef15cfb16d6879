"""Channel counts read at run time.

`Shape(x)` and `Size(x)` turn a tensor's extents into values. Pruning shrinks a channel
axis, so such a value shrinks with it, and wherever it goes the smaller count must still
fit. The analysis follows these values through shape arithmetic (Gather, Slice, Concat,
Unsqueeze, Cast, Add, Mul...), recording at each position the extent it holds and which
channel ids it counts. Where one becomes the shape of a Reshape or Expand output, the
output's channels at that position are coupled with the counted ones (`x.view(b, c, -1)`
and `expand_as` keep working); anywhere else, or at a position that does not carry those
channels, the counted channels are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from .graph import Context


@dataclass(frozen=True)
class Extent:
    """One position of a shape value: the extent it held in the original model (an int, a
    symbolic name, or None when unknown) and, where it depends on a channel count, the ids
    counted; `exact` when it is that count itself (one axis of one map, nothing combined)."""
    dim: int | str | None
    ids: np.ndarray | None = None
    exact: bool = True


#: flat position in a shape value -> what it holds
Extents = dict[int, Extent]

# position-preserving ops on shape values (flat order unchanged)
_SAME_POSITIONS = {"Identity", "Cast", "CastLike", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Neg", "Abs", "Ceil", "Floor"}


def length(ctx: Context, value: ir.Value | None) -> int | None:
    """The element count of a small shape value, when it is known."""
    shape = ctx.shape(value)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape)) if shape else 1


def positions(ctx: Context, value: ir.Value) -> list[tuple] | None:
    """What each position of a 1-D shape value holds: ("literal", int), ("count", ids,
    original extent), ("dim", original extent) or None (unknown). Literals are seen in
    constants and in the constant parts of a Concat."""
    n = length(ctx, value)
    if n is None:
        return None
    if ctx.is_const(value):
        return [("literal", int(v)) for v in ctx.const(value).ravel()]
    extents = ctx.extents.get(value, {})
    out: list = []
    for p in range(n):
        e = extents.get(p)
        if e is None or (e.ids is not None and not e.exact):
            out.append(None)
        elif e.ids is not None:
            out.append(("count", e.ids, e.dim))
        else:
            out.append(("dim", e.dim) if e.dim is not None else None)
    node = value.producer()
    if node is not None and node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
        offset = 0
        for part in node.inputs:
            k = length(ctx, part)
            if k is None:
                return out
            if ctx.is_const(part):
                for j, v in enumerate(ctx.const(part).ravel()):
                    if offset + j < n:
                        out[offset + j] = ("literal", int(v))
            offset += k
    return out


def _counts(extents: Extents) -> list[Extent]:
    return [e for e in extents.values() if e.ids is not None]


def _freeze(ctx: Context, extents: Extents, reason: str) -> None:
    for e in _counts(extents):
        ctx.ids.freeze(np.ravel(e.ids), reason)


def _source(ctx: Context, node: ir.Node) -> None:
    x = node.inputs[0]
    m = ctx.map(x)
    shape = ctx.shape(x)
    rank = m.rank if m is not None else (len(shape) if shape is not None else None)
    if rank is None:
        return
    if node.op_type == "Size":
        if m is not None:
            ctx.extents[node.outputs[0]] = {0: Extent(None, m.flat(), exact=False)}
        return
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    start = start.value if start is not None else 0
    end = end.value if end is not None else rank
    start, end = (max(0, min(rank, a + rank if a < 0 else a)) for a in (start, end))
    out = {}
    for a in range(start, end):
        dim = shape[a] if shape is not None and a < len(shape) else None
        if m is not None and a in m.axes:
            # in a multi-axis map the extent of one axis depends on all its ids
            pos = m.axes.index(a)
            out[a - start] = Extent(m.ids.shape[pos], m.flat(), exact=len(m.axes) == 1)
        elif dim is not None:
            out[a - start] = Extent(dim)
    if out:
        ctx.extents[node.outputs[0]] = out


def _follow(ctx: Context, node: ir.Node, known: dict[int, Extents]) -> Extents | None:
    """The extents of the node's output, or None when the node is not shape arithmetic
    that can be followed (a sink)."""
    op = node.op_type
    if op in _SAME_POSITIONS and set(known) == {0}:
        return known[0]
    if op in ("Gather", "Slice") and set(known) == {0}:
        n = length(ctx, node.inputs[0])
        if ctx.rank(node.inputs[0]) != 1 or n is None:
            return None
        picked = _picked(ctx, node, n)
        if picked is None:
            return None
        return {j: known[0][int(i)] for j, i in enumerate(picked) if int(i) in known[0]}
    if op == "Concat":
        out, offset = {}, 0
        for i, part in enumerate(node.inputs):
            k = length(ctx, part)
            if k is None or ctx.rank(part) != 1:
                return None
            out.update({offset + p: e for p, e in known.get(i, {}).items()})
            offset += k
        return out
    if op in _ELEMENTWISE:
        sizes = [length(ctx, v) for v in node.inputs]
        if any(s is None for s in sizes):
            return None
        n = max(sizes)
        ids: dict[int, list[np.ndarray]] = {}
        for i, extents in known.items():
            for p in range(n):
                e = extents.get(0 if sizes[i] == 1 else p)
                if e is not None and e.ids is not None:
                    ids.setdefault(p, []).append(np.ravel(e.ids))
        # a function of the counts: the extent it holds is not followed
        return {p: Extent(None, np.concatenate(parts), exact=False) for p, parts in ids.items()}
    return None


def _picked(ctx: Context, node: ir.Node, n: int) -> np.ndarray | None:
    """The source positions a Gather or Slice of a 1-D value takes, when constant."""
    if node.op_type == "Gather":
        if not ctx.is_const(node.inputs[1]):
            return None
        index = ctx.const(node.inputs[1]).ravel().astype(np.int64)
        return np.where(index < 0, index + n, index)
    if ctx.opset < 10:
        starts, ends = node.attributes["starts"].value, node.attributes["ends"].value
        steps = [1]
    else:
        if not all(ctx.is_const(v) for v in node.inputs[1:] if v is not None):
            return None
        starts, ends = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
        steps = (ctx.const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None
                 else [1])
    return np.arange(n)[slice(int(starts[0]), int(ends[0]), int(steps[0]))]


def _sink(ctx: Context, node: ir.Node, known: dict[int, Extents]) -> None:
    """Counts used as a Reshape/Expand shape: couple them with the output's channels at
    their positions; any other use freezes them."""
    reason = (f"its channel count is read at run time (Shape/Size) and used by "
              f"{node.op_type} '{node.name}'")
    shaped = node.op_type in ("Reshape", "Expand") and not any(
        _counts(e) for i, e in known.items() if i != 1)
    out = ctx.map(node.outputs[0]) if shaped else None
    if out is None:
        for extents in known.values():
            _freeze(ctx, extents, reason)
        return
    n = length(ctx, node.inputs[1])
    for p, e in known.get(1, {}).items():
        if e.ids is None:
            continue
        axis = p + out.rank - n if n is not None else None
        if e.exact and out.axis is not None and axis == out.axis and len(out.ids) == len(e.ids):
            ctx.ids.unify(e.ids, out.ids)
        else:
            ctx.ids.freeze(np.ravel(e.ids), reason)


def follow(ctx: Context, node: ir.Node) -> None:
    """After a node's rule: record the extents it creates or passes on, or settle the
    channel counts it consumes."""
    if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
        _source(ctx, node)
        return
    known = {i: ctx.extents[v] for i, v in enumerate(node.inputs)
             if v is not None and v in ctx.extents}
    if not known:
        return
    extents = _follow(ctx, node, known) if node.domain in ("", "ai.onnx") else None
    if extents is None:
        if any(_counts(e) for e in known.values()):
            _sink(ctx, node, known)
    elif extents:
        ctx.extents[node.outputs[0]] = extents


def settle_outputs(ctx: Context, outputs) -> None:
    """A channel count that reaches a graph output (or a subgraph) would change it."""
    for v in outputs:
        if v in ctx.extents:
            _freeze(ctx, ctx.extents[v], f"its channel count reaches '{v.name}'")


def reshape_target(ctx: Context, node: ir.Node, in_shape: list) -> list | None:
    """The output shape of a Reshape whose target is computed at run time, from what its
    positions are known to hold (None where unknown)."""
    target = positions(ctx, node.inputs[1])
    if target is None:
        return None
    dims: list = []
    for a, held in enumerate(target):
        if held is None:
            dims.append(None)
        elif held[0] == "literal":
            value = held[1]
            allowzero = node.attributes.get("allowzero")
            if value == 0 and not (allowzero is not None and allowzero.value):
                value = in_shape[a] if a < len(in_shape) else None
            dims.append(value)
        elif held[0] == "count":
            dims.append(held[2])
        else:
            dims.append(held[1])
    if dims.count(-1) == 1:
        resolved = resolve_minus_one(in_shape, dims)
        dims = resolved if resolved is not None else [None if d == -1 else d for d in dims]
    return dims


def resolve_minus_one(in_shape: list, dims: list) -> list | None:
    """A reshape's output dims with its -1 worked out: from the element count, or, with
    symbolic dims, when they cancel (-1 of [N, 8, 64] -> [-1, 8, 8, 8] is N). Dims that
    are None stay unknown; None when -1 cannot be worked out."""
    if -1 not in dims:
        return dims
    dims = list(dims)
    rest = [d for d in dims if d != -1]
    if None in rest or None in in_shape:
        return None
    ints_in = _int_product(d for d in in_shape if isinstance(d, int))
    ints_out = _int_product(d for d in rest if isinstance(d, int))
    syms_in = sorted(d for d in in_shape if isinstance(d, str))
    syms_out = sorted(d for d in rest if isinstance(d, str))
    if not ints_out:
        return None
    if syms_in == syms_out:
        dims[dims.index(-1)] = ints_in // ints_out
        return dims
    left = list(syms_in)
    for d in syms_out:
        if d not in left:
            return None
        left.remove(d)
    if len(left) == 1 and ints_in == ints_out:
        dims[dims.index(-1)] = left[0]
        return dims
    return None


def _int_product(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out
