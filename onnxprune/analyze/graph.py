"""Walk the graph with the op rules and build the coupled channel groups."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedModelError
from ..load import opset, origin
from . import sizes
from .channels import ChannelMap, IdSpace
from .rules import QUANTIZED_OPS, RULES
from .sites import Alive, AttrRewrite, ConstRewrite, Producer, Read, SliceSite, SplitRewrite


@dataclass
class Group:
    """Channels that must be removed together: `classes[k]` is channel k of the group."""

    index: int
    classes: np.ndarray
    producers: list[Producer]
    frozen: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    macs: int = 0

    @property
    def channels(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.channels > 1


@dataclass
class Analysis:
    model: ir.Model
    ids: IdSpace
    roots: np.ndarray
    groups: list[Group]
    producers: list[Producer]
    slices: list[SliceSite]
    const_rewrites: list[ConstRewrite]
    attr_rewrites: list[AttrRewrite]
    split_rewrites: list[SplitRewrite]
    reads: list[Read] = field(default_factory=list)
    total_macs: int = 0

    def alive(self, removed: Iterable[int]) -> Alive:
        """The keep-test for a set of removed class roots."""
        removed = np.fromiter(removed, dtype=np.int64)
        roots = self.roots

        def alive(ids: np.ndarray) -> np.ndarray:
            return ~np.isin(roots[ids], removed)
        return alive

    def class_members(self, producer: Producer) -> np.ndarray:
        """The class root of each output channel of a producer."""
        return self.roots[producer.ids]


class Context:
    """What the op rules see: channel maps, constants, shapes, and the records they make."""

    def __init__(self, model: ir.Model, exclude: list[str]) -> None:
        self.model = model
        self.opset = opset(model)
        self.ids = IdSpace()
        self.maps: dict[ir.Value, ChannelMap] = {}
        self.exclude = exclude
        self.producers: list[Producer] = []
        self.slices: list[SliceSite] = []
        self.const_rewrites: list[ConstRewrite] = []
        self.attr_rewrites: list[AttrRewrite] = []
        self.split_rewrites: list[SplitRewrite] = []
        self.members: list[tuple[ir.Node, np.ndarray]] = []
        self.reads: list[Read] = []
        self.extents: dict[ir.Value, sizes.Extents] = {}  # what shape values hold
        self.derived_shapes: dict[ir.Value, list] = {}  # where shape inference gave up

    # -- reading
    def map(self, value: ir.Value | None) -> ChannelMap | None:
        return self.maps.get(value) if value is not None else None

    def is_const(self, value: ir.Value | None) -> bool:
        return value is not None and value.const_value is not None and not value.is_graph_input()

    def const(self, value: ir.Value) -> np.ndarray:
        return value.const_value.numpy()

    def const_shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        if not self.is_const(value):
            return None
        return tuple(int(d) for d in value.const_value.shape)

    def shape(self, value: ir.Value | None) -> list | None:
        """Dims as ints, symbolic names (str) or None; None when the rank is unknown."""
        if value is None:
            return None
        if self.is_const(value):
            return list(self.const_shape(value))
        if value.shape is None:
            return self.derived_shapes.get(value)
        dims = []
        for d in value.shape:
            dims.append(d if isinstance(d, int) else (d.value if d.value else None))
        return dims

    def rank(self, value: ir.Value | None) -> int | None:
        m = self.map(value)
        if m is not None:
            return m.rank
        shape = self.shape(value)
        return len(shape) if shape is not None else None

    # -- writing
    def set(self, value: ir.Value | None, m: ChannelMap | None) -> None:
        if value is not None and m is not None:
            self.maps[value] = m

    def freeze(self, m: ChannelMap | None, reason: str) -> None:
        if m is not None:
            self.ids.freeze(m.ids, reason)

    def freeze_inputs(self, node: ir.Node, reason: str) -> None:
        for v in node.inputs:
            self.freeze(self.map(v), reason)

    def slice(self, node: ir.Node, index: int, axis: int, ids: np.ndarray,
              role: str = "param") -> None:
        self.slices.append(SliceSite(node, index, axis, np.asarray(ids).ravel(), role))

    def consume(self, node: ir.Node, weight: int, weight_axis: int, ids: np.ndarray,
                data: ChannelMap) -> None:
        """A layer reads channels: slice its weight's input axis, and note the read."""
        self.slice(node, weight, weight_axis, ids, role="consumer")
        self.reads.append(Read(node, 0, data.axes[0], data.ids, data.rank))

    def rewrite_const(self, node: ir.Node, index: int, compute) -> None:
        self.const_rewrites.append(ConstRewrite(node, index, compute))

    def rewrite_attr(self, node: ir.Node, name: str, compute) -> None:
        self.attr_rewrites.append(AttrRewrite(node, name, compute))

    def split(self, node: ir.Node, axis: int, parts: list[np.ndarray]) -> None:
        self.split_rewrites.append(SplitRewrite(node, axis, parts))

    def member(self, node: ir.Node, ids: np.ndarray) -> None:
        self.members.append((node, np.asarray(ids).ravel()))

    def _excluded(self, node: ir.Node, weight: ir.Value) -> bool:
        names = [node.name, origin(weight), *(o.name for o in node.outputs if o is not None)]
        return any(fnmatch.fnmatchcase(n, p) for p in self.exclude for n in names if n)

    def produce(self, node: ir.Node, *, weight: int, axis: int, count: int, output: ir.Value,
                rank: int, frozen: str | None = None) -> None:
        """New candidate channels: the output channels of a layer with a constant weight."""
        if frozen is None and self._excluded(node, node.inputs[weight]):
            frozen = f"'{node.name}' excluded by --exclude"
        ids = self.ids.new(count, frozen=frozen)
        self.producers.append(Producer(node, weight, axis, ids))
        self.slice(node, weight, axis, ids, role="producer")
        out_axis = rank - 1 if node.op_type == "MatMul" else 1
        self.set(output, ChannelMap(rank, (out_axis,), ids))

    def couple_rectangular(self, m: ChannelMap) -> None:
        """A multi-axis map (a channel axis split by a reshape, as in channel shuffle) must
        stay a rectangle after pruning: couple the ids along all axes but the longest, so
        a removal always takes whole slabs."""
        if len(m.axes) < 2:
            return
        free = int(np.argmax(m.ids.shape))
        moved = np.moveaxis(m.ids, free, 0).reshape(m.ids.shape[free], -1)
        for row in moved:
            for other in row[1:]:
                self.ids.union(row[0], other)


def _outer_references(node: ir.Node) -> list[ir.Value]:
    """Values of the enclosing graph read inside a node's subgraphs."""
    refs: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(g):
                for v in inner.inputs:
                    if v is not None and v.graph is node.graph:
                        refs.append(v)
    return refs


def check_supported(model: ir.Model) -> None:
    quantized = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise UnsupportedModelError(
            f"quantized models are not supported (found {', '.join(quantized)}); "
            "prune the float model, then quantize")


def analyze(model: ir.Model, exclude: Iterable[str] = ()) -> Analysis:
    """Find every group of coupled channels in a normalized model."""
    from ..metrics import node_costs

    check_supported(model)
    ctx = Context(model, list(exclude))
    for node in model.graph:
        subgraph_refs = _outer_references(node)
        if subgraph_refs:
            reason = f"{node.op_type} '{node.name}' has subgraphs"
            ctx.freeze_inputs(node, reason)
            for v in subgraph_refs:
                ctx.freeze(ctx.map(v), reason)
            sizes.follow(ctx, node)
            for v in subgraph_refs:
                sizes.settle_outputs(ctx, [v])
            continue
        mapped = any(ctx.map(v) is not None for v in node.inputs)
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is not None:
            rule(ctx, node)
        elif mapped:
            ctx.freeze_inputs(node, f"{node.op_type} '{node.name}': channel semantics unknown")
        sizes.follow(ctx, node)
    for out in model.graph.outputs:
        ctx.freeze(ctx.map(out), f"reaches graph output '{out.name}'")
    sizes.settle_outputs(ctx, model.graph.outputs)

    roots = ctx.ids.roots()
    groups = _build_groups(ctx, roots)
    costs = node_costs(model)
    total = sum(c.macs for c in costs.values())
    for g in groups:
        g.macs = sum(costs[n].macs for n in g.nodes if n in costs)
    return Analysis(model, ctx.ids, roots, groups, ctx.producers, ctx.slices,
                    ctx.const_rewrites, ctx.attr_rewrites, ctx.split_rewrites, ctx.reads, total)


def _build_groups(ctx: Context, roots: np.ndarray) -> list[Group]:
    # Classes that share a producer belong to one group.
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent.setdefault(r, r) != r:
            r = parent[r]
        return r

    for p in ctx.producers:
        rs = roots[p.ids]
        for r in rs[1:]:
            a, b = find(int(rs[0])), find(int(r))
            if a != b:
                parent[max(a, b)] = min(a, b)
    by_key: dict[int, Group] = {}
    order: list[int] = []
    for p in ctx.producers:
        if len(p.ids) == 0:
            continue
        key = find(int(roots[p.ids[0]]))
        if key not in by_key:
            by_key[key] = Group(len(order), np.zeros(0, np.int64), [])
            order.append(key)
        by_key[key].producers.append(p)
    groups = [by_key[k] for k in order]
    class_group = {}
    for g in groups:
        seen: dict[int, None] = {}
        for p in g.producers:
            for r in roots[p.ids]:
                seen.setdefault(int(r))
        g.classes = np.fromiter(seen, dtype=np.int64)
        for r in g.classes:
            class_group[int(r)] = g
            for reason in ctx.ids.frozen_reasons(int(r)):
                if reason not in g.frozen:
                    g.frozen.append(reason)
    # Nodes a group touches: its producers, and every node with a record on its ids.
    touched: dict[int, dict[str, None]] = {id(g): {} for g in groups}
    records = [(p.node, p.ids) for p in ctx.producers] + [(s.node, s.ids) for s in ctx.slices] \
        + ctx.members
    for node, ids in records:
        for r in set(roots[ids].tolist()):
            g = class_group.get(r)
            if g is not None:
                touched[id(g)].setdefault(node.name)
    for g in groups:
        g.nodes = list(touched[id(g)])
    return groups
