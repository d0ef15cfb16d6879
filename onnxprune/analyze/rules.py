"""One rule per op family: how channels flow through the op, and what surgery it needs.

A rule receives the analysis context and a node. It reads the channel maps of
the node's inputs, sets the maps of its outputs, unifies coupled ids, records
constant slices and rewrites, or freezes the channels it cannot follow.

Invariant every rule keeps: an output left without a map is not affected by
pruning (same shape, same values). So an op either maps all outputs whose shape
depends on a mapped input, or freezes those inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from . import sizes
from .channels import ChannelMap

if TYPE_CHECKING:
    from .graph import Context

Rule = Callable[["Context", ir.Node], None]
RULES: dict[str, Rule] = {}

#: Quantized ops: the whole model is declined (scales and zero points per channel
#: would need their own rules).
QUANTIZED_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul",
                 "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn
    return register


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _first_map(ctx: Context, node: ir.Node) -> ChannelMap | None:
    return ctx.map(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None


# --------------------------------------------------------------------------- producers

@rule("Conv")
def conv(ctx: Context, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    m = ctx.map(x)
    wshape = ctx.const_shape(w)
    if wshape is None:
        ctx.freeze_inputs(node, "Conv with a weight computed at run time")
        return
    cout, cin_per_group = wshape[0], wshape[1]
    group = _attr(node, "group", 1)
    rank = len(wshape)
    if m is not None and m.axes != (1,):
        ctx.freeze(m, f"Conv '{node.name}' reads channels on an axis other than 1")
        m = None
    if group == 1:
        if m is not None:
            ctx.consume(node, 1, 1, m.ids, m)
        ctx.produce(node, weight=1, axis=0, count=cout, output=node.outputs[0], rank=rank)
        _bias(ctx, node, 2)
        return
    cin = cin_per_group * group
    if cin_per_group == 1 and cout % group == 0 and m is not None and len(m.ids) == cin:
        # Depthwise (optionally with a channel multiplier): channel c of the input
        # owns outputs c*k .. c*k+k-1, so all of them are one channel.
        out_ids = np.repeat(m.ids, cout // group)
        ctx.slice(node, 1, 0, out_ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            ctx.slice(node, 2, 0, out_ids)
        ids = m.ids
        ctx.rewrite_attr(node, "group", lambda alive: int(alive(ids).sum()))
        ctx.set(node.outputs[0], ChannelMap(rank, (1,), out_ids))
        ctx.member(node, m.ids)
        return
    if cin_per_group == 1 and m is None:
        return  # depthwise over an untracked input: nothing to remove, nothing changes
    if (m is not None and len(m.ids) != cin) or cout % group:
        ctx.freeze(m, f"grouped Conv '{node.name}' (group={group}) of unexpected shape")
        m = None
    # Grouped: every group must lose the same count. Couple position j of every group
    # (inputs and outputs alike), so removing one channel removes it from each group.
    if m is not None:
        per_group = m.ids.reshape(group, cin_per_group)
        for k in range(1, group):
            ctx.ids.unify(per_group[0], per_group[k])
        ctx.consume(node, 1, 1, per_group[0], m)
    ctx.produce(node, weight=1, axis=0, count=cout, output=node.outputs[0], rank=rank)
    out = ctx.map(node.outputs[0]).ids.reshape(group, cout // group)
    for k in range(1, group):
        ctx.ids.unify(out[0], out[k])
    _bias(ctx, node, 2)


@rule("ConvTranspose")
def conv_transpose(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    wshape = ctx.const_shape(node.inputs[1])
    if wshape is None:
        ctx.freeze_inputs(node, "ConvTranspose with a weight computed at run time")
        return
    group, rank = _attr(node, "group", 1), len(wshape)
    if m is not None and m.axes != (1,):
        ctx.freeze(m, f"ConvTranspose '{node.name}' reads channels on an axis other than 1")
        m = None
    if group == 1:
        if m is not None:
            ctx.consume(node, 1, 0, m.ids, m)
        ctx.produce(node, weight=1, axis=1, count=wshape[1], output=node.outputs[0], rank=rank)
        _bias(ctx, node, 2)
        return
    if wshape[1] == 1 and m is not None and len(m.ids) == group == wshape[0]:
        ctx.slice(node, 1, 0, m.ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            ctx.slice(node, 2, 0, m.ids)
        ids = m.ids
        ctx.rewrite_attr(node, "group", lambda alive: int(alive(ids).sum()))
        ctx.set(node.outputs[0], ChannelMap(rank, (1,), m.ids))
        ctx.member(node, m.ids)
        return
    if m is not None:
        ctx.freeze(m, f"grouped ConvTranspose '{node.name}' (group={group})")
    ctx.produce(node, weight=1, axis=1, count=wshape[1] * group, output=node.outputs[0],
                rank=rank, frozen=f"grouped ConvTranspose '{node.name}' output")


def _bias(ctx: Context, node: ir.Node, index: int, broadcast: bool = False) -> None:
    """Slice a bias input along the producer's output channels: a Conv bias is 1-D;
    a Gemm bias broadcasts against the output from the right."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return
    out = ctx.map(node.outputs[0])
    bshape = ctx.const_shape(node.inputs[index])
    if bshape is None:
        ctx.freeze(out, f"'{node.name}' has a bias computed at run time")
        return
    if out is None or not bshape:
        return
    bias_axis = len(bshape) - (out.rank - out.axes[0]) if broadcast else 0
    if 0 <= bias_axis < len(bshape) and bshape[bias_axis] > 1:
        ctx.slice(node, index, bias_axis, out.ids)


@rule("Gemm")
def gemm(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    bshape = ctx.const_shape(node.inputs[1])
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
    if bshape is None or trans_a:
        ctx.freeze_inputs(node, f"Gemm '{node.name}' with a run-time weight or transA")
        return
    if m is not None:
        if m.axes != (1,):
            ctx.freeze(m, f"Gemm '{node.name}' reads channels on an axis other than 1")
        else:
            ctx.consume(node, 1, 1 if trans_b else 0, m.ids, m)
    ctx.produce(node, weight=1, axis=0 if trans_b else 1, count=bshape[0 if trans_b else 1],
                output=node.outputs[0], rank=2)
    _bias(ctx, node, 2, broadcast=True)


@rule("MatMul")
def matmul(ctx: Context, node: ir.Node) -> None:
    a, b = node.inputs
    ma = ctx.map(a)
    bshape = ctx.const_shape(b)
    if bshape is None or len(bshape) != 2 or ctx.map(b) is not None:
        ctx.freeze_inputs(node, f"MatMul '{node.name}' between two activations")
        return
    rank = ma.rank if ma is not None else ctx.rank(a)
    if rank is None or rank < 2:
        ctx.freeze_inputs(node, f"MatMul '{node.name}' input of unknown rank")
        return
    if ma is not None:
        if ma.axes != (rank - 1,):
            ctx.freeze(ma, f"MatMul '{node.name}' with channels off the reduced axis")
        else:
            ctx.consume(node, 1, 0, ma.ids, ma)
    ctx.produce(node, weight=1, axis=1, count=bshape[1], output=node.outputs[0], rank=rank)


# --------------------------------------------------------------------------- per-channel ops

@rule("BatchNormalization", "InstanceNormalization")
def channel_norm(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    extra = [o for o in node.outputs[1:] if o is not None and o.uses()]
    if extra:
        ctx.freeze(m, f"{node.op_type} '{node.name}' in training mode")
        return
    if 1 not in m.axes:
        if node.op_type == "InstanceNormalization":
            ctx.freeze(m, f"InstanceNormalization '{node.name}' normalizes over the mapped axis")
            return
        ctx.set(node.outputs[0], m)
        return
    if m.axes != (1,):
        ctx.freeze(m, f"{node.op_type} '{node.name}' over a split channel axis")
        return
    for index in range(1, len(node.inputs)):
        if node.inputs[index] is not None:
            if ctx.const_shape(node.inputs[index]) is None:
                ctx.freeze(m, f"{node.op_type} '{node.name}' with run-time parameters")
                return
            ctx.slice(node, index, 0, m.ids)
    ctx.set(node.outputs[0], m)
    ctx.member(node, m.ids)


@rule("LayerNormalization")
def layer_norm(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    first = _axis(_attr(node, "axis", -1), m.rank)
    if any(a >= first for a in m.axes):
        ctx.freeze(m, f"LayerNormalization '{node.name}' normalizes across channels "
                      "(removing one changes the mean of the others)")
        return
    ctx.set(node.outputs[0], m)


UNARY = ["Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
         "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Gelu", "Mish", "Erf", "Exp",
         "Log", "Sqrt", "Reciprocal", "Abs", "Neg", "Floor", "Ceil", "Round", "Sign", "Sin",
         "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
         "Not", "IsNaN", "IsInf", "Identity", "Cast", "Dropout", "Clip", "Shrink", "Swish",
         "BitwiseNot"]


@rule(*UNARY)
def unary(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    for extra in node.inputs[1:]:  # Clip's min/max, Dropout's ratio: scalars
        if extra is not None and (ctx.map(extra) is not None or (ctx.rank(extra) or 0) > 0):
            ctx.freeze(m, f"{node.op_type} '{node.name}' with non-scalar parameters")
            return
    for out in node.outputs:  # Dropout's mask has the data's shape
        if out is not None:
            ctx.set(out, m)


#: Binary ops where zeroing a channel of the second operand would divide by zero
#: or otherwise not equal removal.
_SECOND_OPERAND_UNSAFE = {"Div", "Pow", "Mod", "BitShift"}


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
      "And", "Or", "Xor", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Mod",
      "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor")
def broadcast(ctx: Context, node: ir.Node) -> None:
    """Elementwise ops with numpy broadcasting: mapped operands are coupled position by position."""
    inputs = [v for v in node.inputs]
    maps = [ctx.map(v) if v is not None else None for v in inputs]
    if not any(maps):
        return
    ranks = [m.rank if m is not None else ctx.rank(v) for v, m in zip(inputs, maps)]
    present = [m for m in maps if m is not None]
    if any(r is None for r in ranks):
        ctx.freeze_inputs(node, f"{node.op_type} '{node.name}' with an operand of unknown rank")
        return
    rank = max(ranks)
    aligned = [m.shifted(rank) if m is not None else None for m in maps]
    ref = next(m for m in aligned if m is not None)
    reason = None
    if any(m.axes != ref.axes or m.ids.shape != ref.ids.shape for m in aligned if m is not None):
        reason = "operands carry channels on different axes"
    if node.op_type in _SECOND_OPERAND_UNSAFE and maps[1] is not None:
        reason = "channels in the divisor or exponent"
    slices: list[tuple[int, int]] = []
    if reason is None:
        for index, (v, m, r) in enumerate(zip(inputs, aligned, ranks)):
            if m is not None or v is None:
                continue
            shape = ctx.const_shape(v) if ctx.is_const(v) else ctx.shape(v)
            for a in ref.axes:
                local = a - (rank - r)
                if local < 0:
                    continue
                dim = shape[local] if shape is not None else None
                if dim == 1:
                    continue
                if ctx.is_const(v) and isinstance(dim, int) and len(ref.axes) == 1:
                    slices.append((index, local))
                else:
                    reason = "an untracked operand of the same size along the channels"
    if reason is not None:
        for m in present:
            ctx.freeze(m, f"{node.op_type} '{node.name}': {reason}")
        return
    for m in aligned:
        if m is not None and m is not ref:
            ctx.ids.unify(ref.ids, m.ids)
    for index, local in slices:
        ctx.slice(node, index, local, ref.ids)
    if slices:
        ctx.member(node, ref.ids)
    ctx.set(node.outputs[0], ref)


# --------------------------------------------------------------------------- spatial ops

@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
      "MaxRoiPool")
def pool(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    if any(a >= 2 for a in m.axes) or (len(node.outputs) > 1 and node.outputs[1] is not None
                                       and node.outputs[1].uses()):
        ctx.freeze(m, f"{node.op_type} '{node.name}' over channels or with indices output")
        return
    ctx.set(node.outputs[0], m)


@rule("Resize", "Upsample")
def resize(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    axes_attr = _attr(node, "axes")
    # Scales are per axis: a channel axis must keep scale 1.
    for index in range(1, len(node.inputs)):
        v = node.inputs[index]
        if v is None or not ctx.is_const(v):
            continue
        values = ctx.const(v)
        if values.size == 0:
            continue
        positions = list(axes_attr) if axes_attr is not None else list(range(values.size))
        is_sizes = node.op_type == "Resize" and index == 3
        is_roi = node.op_type == "Resize" and index == 1
        if is_roi:
            continue
        for a in m.axes:
            if a not in positions:
                continue
            k = positions.index(a)
            if is_sizes:
                ids, axis_pos = m.ids, m.axes.index(a)

                def new_sizes(alive, values=values, k=k, ids=ids, axis_pos=axis_pos):
                    out = values.copy()
                    out[k] = _kept_extent(ids, axis_pos, alive)
                    return out
                ctx.rewrite_const(node, index, new_sizes)
            elif values[k] != 1:
                ctx.freeze(m, f"{node.op_type} '{node.name}' scales the channel axis")
                return
    ctx.set(node.outputs[0], m)


@rule("Pad")
def pad(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    pads = _attr(node, "pads") if ctx.opset < 11 else (
        ctx.const(node.inputs[1]) if len(node.inputs) > 1 and ctx.is_const(node.inputs[1]) else None)
    if pads is None:
        ctx.freeze(m, f"Pad '{node.name}' with run-time pads")
        return
    pads = np.asarray(pads).ravel()
    axes = list(range(m.rank))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        if not ctx.is_const(node.inputs[3]):
            ctx.freeze(m, f"Pad '{node.name}' with run-time axes")
            return
        axes = [_axis(int(a), m.rank) for a in ctx.const(node.inputs[3])]
    n = len(axes)
    for a in m.axes:
        if a in axes and (pads[axes.index(a)] != 0 or pads[axes.index(a) + n] != 0):
            ctx.freeze(m, f"Pad '{node.name}' pads the channel axis")
            return
    ctx.set(node.outputs[0], m)


# --------------------------------------------------------------------------- channel-axis ops

def _kept_extent(ids: np.ndarray, axis_pos: int, alive) -> int:
    """How many positions survive along one axis of a (possibly multi-axis) id array.

    Removals from a multi-axis map take whole slabs (see Context.couple_rectangular), so
    a position survives if anything in its slab does."""
    keep = alive(ids)
    other = tuple(i for i in range(ids.ndim) if i != axis_pos)
    return int(keep.any(axis=other).sum()) if other else int(keep.sum())


@rule("Concat")
def concat(ctx: Context, node: ir.Node) -> None:
    maps = [ctx.map(v) for v in node.inputs]
    if not any(maps):
        return
    rank = next(m.rank for m in maps if m is not None)
    axis = _axis(_attr(node, "axis"), rank)
    if all(m is not None and m.axes == (axis,) or m is None for m in maps):
        parts = []
        for v, m in zip(node.inputs, maps):
            if m is not None:
                parts.append(m.ids)
                continue
            shape = ctx.const_shape(v) if ctx.is_const(v) else ctx.shape(v)
            dim = shape[axis] if shape is not None and len(shape) == rank else None
            if not isinstance(dim, int):
                ctx.freeze_inputs(node, f"Concat '{node.name}' with an input of unknown size")
                return
            parts.append(ctx.ids.new(dim, frozen=f"concatenated by '{node.name}' with an "
                                                     "untracked input"))
        ctx.set(node.outputs[0], ChannelMap(rank, (axis,), np.concatenate(parts)))
        return
    ref = next(m for m in maps if m is not None)
    if all(m is not None and m.axes == ref.axes and m.ids.shape == ref.ids.shape
           and axis not in m.axes for m in maps):
        for m in maps[1:]:
            ctx.ids.unify(ref.ids, m.ids)
        ctx.set(node.outputs[0], ref)
        return
    ctx.freeze_inputs(node, f"Concat '{node.name}' mixes channel layouts")


@rule("Split")
def split(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    axis = _axis(_attr(node, "axis", 0), m.rank)
    outputs = list(node.outputs)
    if axis not in m.axes:
        for out in outputs:
            ctx.set(out, m)
        return
    if m.axes != (axis,):
        ctx.freeze(m, f"Split '{node.name}' of a split channel axis")
        return
    sizes = _attr(node, "split")
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        if not ctx.is_const(node.inputs[1]):
            ctx.freeze(m, f"Split '{node.name}' with run-time sizes")
            return
        sizes = ctx.const(node.inputs[1])
    total = len(m.ids)
    if sizes is None:
        n = len(outputs)
        chunk = -(-total // n)  # opset 18 num_outputs: the last chunk may be smaller
        sizes = [min(chunk, total - i * chunk) for i in range(n)]
    bounds = np.cumsum([0, *[int(s) for s in sizes]])
    parts = [m.ids[bounds[i]:bounds[i + 1]] for i in range(len(outputs))]
    for out, ids in zip(outputs, parts):
        ctx.set(out, ChannelMap(m.rank, (axis,), ids))
    ctx.split(node, axis, parts)


@rule("Slice")
def slice_(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    if ctx.opset < 10:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps = _attr(node, "axes"), None
    else:
        args = [node.inputs[i] if len(node.inputs) > i else None for i in range(1, 5)]
        if any(a is not None and not ctx.is_const(a) for a in args):
            ctx.freeze(m, f"Slice '{node.name}' with run-time bounds")
            return
        starts, ends, axes, steps = [ctx.const(a) if a is not None else None for a in args]
    starts, ends = list(np.ravel(starts)), list(np.ravel(ends))
    axes = list(range(len(starts))) if axes is None else [_axis(int(a), m.rank)
                                                            for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else list(np.ravel(steps))
    touched = [k for k, a in enumerate(axes) if a in m.axes]
    if not touched:
        ctx.set(node.outputs[0], m)
        return
    if m.axis is None or len(touched) != 1 or steps[touched[0]] != 1:
        ctx.freeze(m, f"Slice '{node.name}' of channels with a step or on a split axis")
        return
    k = touched[0]
    n = len(m.ids)
    start, stop, _ = slice(int(starts[k]), int(ends[k])).indices(n)
    stop = max(stop, start)
    ids = m.ids

    def bound(which: int):
        def compute(alive):
            keep = alive(ids)
            new_start = int(keep[:start].sum())
            values = np.array(starts if which == 0 else ends, dtype=np.int64)
            values[k] = new_start if which == 0 else new_start + int(keep[start:stop].sum())
            return values
        return compute

    if ctx.opset < 10:
        ctx.rewrite_attr(node, "starts", lambda alive: [int(v) for v in bound(0)(alive)])
        ctx.rewrite_attr(node, "ends", lambda alive: [int(v) for v in bound(1)(alive)])
    else:
        ctx.rewrite_const(node, 1, bound(0))
        ctx.rewrite_const(node, 2, bound(1))
    ctx.set(node.outputs[0], ChannelMap(m.rank, m.axes, ids[start:stop]))


@rule("Transpose")
def transpose(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    perm = _attr(node, "perm") or list(reversed(range(m.rank)))
    new_axis = {old: new for new, old in enumerate(perm)}
    order = sorted(range(len(m.axes)), key=lambda i: new_axis[m.axes[i]])
    ctx.set(node.outputs[0], ChannelMap(m.rank, tuple(sorted(new_axis[a] for a in m.axes)),
                                        np.transpose(m.ids, order)))


@rule("Squeeze", "Unsqueeze")
def squeeze(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        if not ctx.is_const(node.inputs[1]):
            ctx.freeze(m, f"{node.op_type} '{node.name}' with run-time axes")
            return
        axes = ctx.const(node.inputs[1])
    if axes is None:
        if node.op_type == "Unsqueeze":
            ctx.freeze(m, f"Unsqueeze '{node.name}' without axes")
            return
        shape = ctx.shape(node.inputs[0])
        if shape is None:
            ctx.freeze(m, f"Squeeze '{node.name}' of unknown shape")
            return
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = [int(a) for a in np.ravel(axes)]
    if node.op_type == "Squeeze":
        removed = {_axis(a, m.rank) for a in axes}
        kept = [a for a in range(m.rank) if a not in removed]
        if any(a in removed for a in m.axes):
            ctx.freeze(m, f"Squeeze '{node.name}' of a channel axis")
            return
        mapping = {old: new for new, old in enumerate(kept)}
        ctx.set(node.outputs[0], m.renumbered(len(kept), mapping))
    else:
        rank = m.rank + len(axes)
        inserted = {_axis(a, rank) for a in axes}
        old_axes = [a for a in range(rank) if a not in inserted]
        mapping = {old: new for old, new in enumerate(old_axes)}
        ctx.set(node.outputs[0], m.renumbered(rank, mapping))


@rule("Reshape", "Flatten")
def reshape(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    in_shape = ctx.shape(node.inputs[0])
    if in_shape is not None:  # the map knows the mapped dims even when inference does not
        in_shape = list(in_shape)
        for pos, a in enumerate(m.axes):
            in_shape[a] = m.ids.shape[pos]
    out_shape = ctx.shape(node.outputs[0])
    target, literals = None, []
    if node.op_type == "Reshape":
        if ctx.is_const(node.inputs[1]):
            target = ctx.const(node.inputs[1]).astype(np.int64)
        else:
            # a shape computed at run time: what is known of its positions fills in what
            # shape inference could not
            guess = sizes.reshape_target(ctx, node, in_shape or [])
            if guess is not None and (out_shape is None or len(out_shape) == len(guess)):
                out_shape = [g if g is not None else (out_shape[k] if out_shape else None)
                             for k, g in enumerate(guess)]
            literals = (None if in_shape is None or out_shape is None else
                        _runtime_target(ctx, node, m, in_shape, out_shape))
            if literals is None:
                ctx.freeze(m, f"Reshape '{node.name}' to a run-time shape that fixes the "
                              "channel count")
                return
        if in_shape is not None and target is not None:
            out_shape = _reshape_result(in_shape, target, _attr(node, "allowzero", 0)) or out_shape
    elif in_shape is not None:
        k = _axis(_attr(node, "axis", 1), len(in_shape))
        out_shape = [in_shape[0] if k == 1 else _prod(in_shape[:k]), _prod(in_shape[k:])]
    if in_shape is None or out_shape is None:
        ctx.freeze(m, f"{node.op_type} '{node.name}' of unknown shape")
        return
    out = _reshape_map(m, in_shape, list(out_shape))
    if out is None:
        ctx.freeze(m, f"{node.op_type} '{node.name}' moves channels in a way that cannot be "
                      "followed")
        return
    if node.outputs[0].shape is None:
        ctx.derived_shapes[node.outputs[0]] = list(out_shape)
    ctx.couple_rectangular(out)
    ctx.set(node.outputs[0], out)
    for a in literals:
        _rewrite_literal(ctx, node, a, out.ids)
    if target is not None and any(target[a] not in (0, -1) for a in out.axes
                                  if a < len(target)):
        ids, axes = out.ids, out.axes

        def new_target(alive, target=target):
            values = target.copy()
            for pos, a in enumerate(axes):
                if values[a] not in (0, -1):
                    values[a] = _kept_extent(ids, pos, alive)
            return values
        ctx.rewrite_const(node, 1, new_target)


def _runtime_target(ctx: Context, node: ir.Node, m: ChannelMap, in_shape: list,
                    out_shape: list) -> list[int] | None:
    """Whether a Reshape to a shape computed at run time keeps working after pruning: at
    each position where the data's channels land, the shape must hold -1, 0 (copying the
    same axis), the count of those very channels read at run time (x.view(b, c, -1) with
    c = x.size(1)), or a constant equal to the channel extent that can be rewritten (the
    dynamo exporter's Concat(batch, [C], [-1])). Returns the positions to rewrite, or None
    when the shape cannot be followed."""
    target = sizes.positions(ctx, node.inputs[1])
    if target is None or len(target) != len(out_shape):
        return None
    out = _reshape_map(m, in_shape, list(out_shape))
    rewrites = []
    for a, held in enumerate(target):
        if held == ("literal", -1):
            continue
        if held == ("literal", 0) and not _attr(node, "allowzero", 0):
            if a in m.axes and len(m.axes) != 1:
                return None
            continue  # copies the input's extent at the same axis, pruned or not
        if held is not None and held[0] == "count":
            continue  # checked against the output map in sizes.follow (coupled or frozen)
        if out is None:
            return None
        if a not in out.axes:
            continue  # a literal or another extent where no channels land
        if held is None or held[0] != "literal" or len(out.axes) != 1 \
                or held[1] != out.ids.shape[0] or _literal_owner(ctx, node, a) is None:
            return None
        rewrites.append(a)
    return rewrites


def _literal_owner(ctx: Context, node: ir.Node, position: int) -> tuple[ir.Node, int, int] | None:
    """The constant that holds `position` of node's shape input (input 1): (node, input
    index, offset) of the shape itself or of a constant part of the one Concat making it."""
    value = node.inputs[1]
    if ctx.is_const(value):
        return node, 1, position
    concat = value.producer()
    if concat is None or concat.op_type != "Concat" or len(value.uses()) != 1:
        return None
    offset = position
    for index, part in enumerate(concat.inputs):
        k = sizes.length(ctx, part)
        if k is None:
            return None
        if offset < k:
            return (concat, index, offset) if ctx.is_const(part) else None
        offset -= k
    return None


def _rewrite_literal(ctx: Context, node: ir.Node, position: int, ids: np.ndarray) -> None:
    """The constant holding a channel extent in a shape becomes the kept extent."""
    owner, index, offset = _literal_owner(ctx, node, position)
    original = ctx.const(owner.inputs[index]).copy()

    def compute(alive, original=original, offset=offset, ids=ids):
        values = original.copy()
        values.flat[offset] = int(alive(ids).sum())
        return values
    ctx.rewrite_const(owner, index, compute)


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def _reshape_result(in_shape, target, allowzero) -> list | None:
    dims = [in_shape[i] if (t == 0 and not allowzero and i < len(in_shape)) else int(t)
            for i, t in enumerate(target)]
    return sizes.resolve_minus_one(in_shape, dims)


def _reshape_map(m: ChannelMap, in_shape: list, out_shape: list) -> ChannelMap | None:
    """Follow channel ids through a reshape: peel equal leading/trailing dims, then
    rebuild the id layout of the static middle block."""
    n_in, n_out = len(in_shape), len(out_shape)
    lead = 0
    while lead < min(n_in, n_out) and in_shape[lead] == out_shape[lead] \
            and in_shape[lead] is not None:
        lead += 1
    trail = 0
    while trail < min(n_in, n_out) - lead and in_shape[n_in - 1 - trail] == \
            out_shape[n_out - 1 - trail] and in_shape[n_in - 1 - trail] is not None:
        trail += 1
    mid_in = list(range(lead, n_in - trail))
    if all(a < lead for a in m.axes):
        return ChannelMap(n_out, m.axes, m.ids)
    if all(a >= n_in - trail for a in m.axes):
        return ChannelMap(n_out, tuple(a - n_in + n_out for a in m.axes), m.ids)
    if not all(a in mid_in for a in m.axes):
        return None
    in_dims = in_shape[lead:n_in - trail]
    out_dims = out_shape[lead:n_out - trail]
    if _prod(in_dims) is None or _prod(out_dims) is None or _prod(in_dims) != _prod(out_dims) \
            or _prod(in_dims) > 50_000_000:
        return None
    local = [a - lead for a in m.axes]
    view = [in_dims[i] if i in local else 1 for i in range(len(in_dims))]
    full = np.broadcast_to(m.ids.reshape(view), in_dims).reshape(out_dims)
    varying = [k for k in range(full.ndim)
               if full.shape[k] > 1 and not np.all(full == full.take([0], axis=k))]
    index = tuple(slice(None) if k in varying else 0 for k in range(full.ndim))
    return ChannelMap(n_out, tuple(lead + k for k in varying), np.ascontiguousarray(full[index]))


@rule("Expand")
def expand(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    # what each position of the target holds: a literal, or a channel count read at run
    # time (x.expand_as(y) gives Expand(x, Shape(y)))
    target = sizes.positions(ctx, node.inputs[1])
    if target is None:
        ctx.freeze(m, f"Expand '{node.name}' to a run-time shape of unknown length")
        return
    rank = max(m.rank, len(target))
    out = m.shifted(rank)
    literals = []
    for a in out.axes:
        local = a - (rank - len(target))
        if local < 0 or target[local] == ("literal", 1):
            continue
        held = target[local]
        if held is not None and len(out.axes) == 1 and (
                (held[0] == "count" and np.array_equal(held[1], out.ids)) or
                (held[0] == "literal" and held[1] == len(out.ids)
                 and _literal_owner(ctx, node, local) is not None)):
            if held[0] == "literal":  # the channel count as a constant: it follows the pruning
                literals.append(local)
            continue
        ctx.freeze(m, f"Expand '{node.name}' sets the channel count" if held else
                   f"Expand '{node.name}' to a run-time shape")
        return
    ctx.set(node.outputs[0], out)
    for local in literals:
        _rewrite_literal(ctx, node, local, out.ids)


@rule("Tile")
def tile(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    if ctx.is_const(node.inputs[1]):
        repeats = ctx.const(node.inputs[1]).ravel()
        if all(repeats[a] == 1 for a in m.axes):
            ctx.set(node.outputs[0], m)
            return
    ctx.freeze(m, f"Tile '{node.name}' repeats along channels")


@rule("Gather")
def gather(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    axis = _axis(_attr(node, "axis", 0), m.rank)
    index_rank = ctx.rank(node.inputs[1])
    if axis in m.axes or index_rank is None:
        ctx.freeze(m, f"Gather '{node.name}' picks channels")
        return
    mapping = {a: (a if a < axis else a + index_rank - 1) for a in m.axes}
    ctx.set(node.outputs[0], m.renumbered(m.rank + index_rank - 1, mapping))


REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"]


@rule(*REDUCE)
def reduce(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    keepdims = _attr(node, "keepdims", 1)
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [_attr(node, "axis", 0)]
    else:
        axes = _attr(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            if not ctx.is_const(node.inputs[1]):
                ctx.freeze(m, f"{node.op_type} '{node.name}' over run-time axes")
                return
            axes = ctx.const(node.inputs[1]).ravel().tolist()
        if axes is None or len(axes) == 0:
            if _attr(node, "noop_with_empty_axes", 0):
                ctx.set(node.outputs[0], m)
                return
            axes = list(range(m.rank))
    axes = {_axis(int(a), m.rank) for a in axes}
    if axes & set(m.axes):
        ctx.freeze(m, f"{node.op_type} '{node.name}' reduces over channels")
        return
    if keepdims:
        ctx.set(node.outputs[0], m)
    else:
        kept = [a for a in range(m.rank) if a not in axes]
        ctx.set(node.outputs[0], m.renumbered(len(kept), {a: kept.index(a) for a in m.axes}))


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: Context, node: ir.Node) -> None:
    m = _first_map(ctx, node)
    if m is None:
        return
    axis = _axis(_attr(node, "axis", -1 if ctx.opset >= 13 else 1), m.rank)
    coupled = {axis} if ctx.opset >= 13 else set(range(axis, m.rank))
    if coupled & set(m.axes):
        ctx.freeze(m, f"{node.op_type} '{node.name}' normalizes across channels")
        return
    ctx.set(node.outputs[0], m)


@rule("Shape", "Size")
def shape_of(ctx: Context, node: ir.Node) -> None:
    """Shape values follow the pruned sizes at run time; the self-check verifies the result."""
