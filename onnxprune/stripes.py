"""Stripe-wise pruning (SWP) on the ONNX side: what a model with zeroed stripes can lose.

Meng et al., "Pruning Filter in Filter" (NeurIPS 2020), train a filter skeleton that
switches off *stripes*: the 1×1×C piece W[n, :, i, j] of filter n at kernel position
(i, j). Once the skeleton is folded into the weights, a dead stripe is an all-zero
W[n, :, i, j]. This module needs no framework; it works on a normalized onnx-ir model
(`onnxprune.load.load_normalized`) and does, in place:

1. **Dead filters** (every stripe of W[n] zero) are removed as channels, with their
   downstream channels, through the ordinary analysis and surgery
   (`onnxprune.analyze.analyze`, `onnxprune.apply.apply`). A channel goes only when its
   group is prunable, every producer filter of it is zero, and its value at every layer
   that reads it is exactly zero: a dead filter still outputs its bias, and a
   normalization shift (BatchNorm's β − γ·μ/σ) can make it a nonzero constant that the
   next layers see, so removing it would change the outputs. Such channels (and those
   of frozen groups) keep their zero filters and are listed, with the reason, in
   `StripeReport.kept_filters`. The values are read by running the model with
   onnxruntime on two random inputs: a channel whose filters are all zero no longer
   depends on the input, so this is a check of constants, not a sample. With
   `round_to` (default 8) a group whose channel count is a multiple of it keeps enough
   dead channels, as zero filters, to stay one: unaligned channel counts cost
   onnxruntime more than the removed filters save (benchmarks/RESULTS.md).
2. **Dead kernel rows and columns**: a kernel position (i, j) that is zero in every
   filter of a Conv is removed when it lies on a border row or column of the kernel
   (cut repeatedly from each side; a dead interior row stays). Cutting `t` top rows
   changes the top pad from `p` to `p − t·dilation`; where that goes below zero the
   input is cropped instead by a `Slice` inserted before the Conv (likewise bottom,
   left and right), so the output is unchanged.
3. **Inference form** (`form`): each conv runs either dense, its remaining dead
   stripes as zeros, or in the paper's *stripe form* (`stripe_form`): one 1×1 Conv
   over the live stripes, then per kernel offset a shifted Slice of its stripes'
   outputs, gathered into their filters' channels and summed. "auto" (default) picks
   the stripe form only where it measured faster in onnxruntime: high stripe sparsity
   on wide, large layers (`STRIPE_FORM_RULES`, `STRIPE_FORM_MIN_MACS`;
   benchmarks/RESULTS.md, "SWP inference form").

`stripe_stats` counts live stripes per Conv and the parameters and MACs the paper
counts: a live stripe of a layer with C input channels (per group) costs C parameters
and C·H_out·W_out MACs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .analyze import Analysis, analyze
from .apply import Surgery, apply
from .errors import UnsupportedModelError, VerificationError
from .load import (
    ORIGIN,
    clear_intermediate_shapes,
    infer_shapes,
    load_normalized,
    origin,
    save_model,
    to_proto_bytes,
)
from .metrics import node_costs, total_macs, total_params

_INT64_MAX = np.iinfo(np.int64).max


# --------------------------------------------------------------------------- counting

@dataclass
class LayerStripes:
    """Stripes of one 2-D Conv (weight N × C/g × kh × kw)."""

    node: str
    weight: str
    filters: int
    in_channels: int          # per group: the length of one stripe
    kernel: tuple[int, int]
    groups: int
    stripes: int              # N · kh · kw
    live: int                 # stripes with a nonzero entry
    out_positions: int        # H_out · W_out for one sample (0 if unknown)
    params_dense: int         # weight entries
    params_stripes: int       # live · C/g
    macs_dense: int           # from onnxprune.metrics
    macs_stripes: int         # live · C/g · H_out · W_out


def _conv2d_weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "Conv" or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or w.is_graph_input() or len(w.const_value.shape) != 4:
        return None
    return w.const_value.numpy()


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _out_positions(node: ir.Node) -> int:
    shape = node.outputs[0].shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return 0
    return int(shape[2]) * int(shape[3])


def live_stripes(weight: np.ndarray) -> np.ndarray:
    """N × kh × kw: True where stripe W[n, :, i, j] has a nonzero entry."""
    return np.any(weight != 0, axis=1)


def stripe_stats(model: ir.Model) -> list[LayerStripes]:
    """Live stripes and stripe-counted parameters and MACs of every 2-D Conv."""
    costs = node_costs(model)
    layers = []
    for node in model.graph:
        w = _conv2d_weight(node)
        if w is None:
            continue
        n, c, kh, kw = (int(d) for d in w.shape)
        live = int(live_stripes(w).sum())
        positions = _out_positions(node)
        cost = costs.get(node.name)
        layers.append(LayerStripes(
            node=node.name, weight=origin(node.inputs[1]), filters=n, in_channels=c,
            kernel=(kh, kw), groups=int(_attr(node, "group", 1)), stripes=n * kh * kw, live=live,
            out_positions=positions, params_dense=int(w.size), params_stripes=live * c,
            macs_dense=int(cost.macs) if cost else 0, macs_stripes=live * c * positions))
    return layers


# --------------------------------------------------------------------------- report

@dataclass
class StripeReport:
    """What `prune_stripes` found and did. Counts are for one sample."""

    before: list[LayerStripes]        # every 2-D Conv of the model as given
    after: list[LayerStripes]         # the same layers after the surgery
    params_before: int                # dense, the model as given
    macs_before: int
    params_after: int                 # the surgered model as onnxruntime runs it
    macs_after: int
    params_stripes: int               # the surgered model, convs counted by live stripes
    macs_stripes: int
    removed_filters: list[dict] = field(default_factory=list)
    kept_filters: list[dict] = field(default_factory=list)
    kernel_cuts: list[dict] = field(default_factory=list)
    stripe_form: list[dict] = field(default_factory=list)  # convs put into the stripe form
    slices: list[dict] = field(default_factory=list)     # the channel surgery's plan entries
    updates: list[dict] = field(default_factory=list)

    @property
    def stripes(self) -> int:
        """Stripes of the model as given: N·kh·kw summed over the convs with group 1
        (the layers SWP trains; grouped and depthwise convs are listed but not counted)."""
        return sum(layer.stripes for layer in self.before if layer.groups == 1)

    @property
    def live(self) -> int:
        """Live stripes left in those convs after the surgery."""
        counted = {layer.node for layer in self.before if layer.groups == 1}
        return sum(layer.live for layer in self.after if layer.node in counted)

    @property
    def sparsity(self) -> float:
        """Fraction of the stripes of the group-1 convs that are dead (zero, removed or cut)."""
        return 1.0 - self.live / self.stripes if self.stripes else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(stripes=self.stripes, live=self.live, sparsity=self.sparsity)
        return out

    def format(self) -> str:
        after = {layer.node: layer for layer in self.after}
        lines = [(f"{'layer':<28} {'kernel':>9} {'filters':>9} {'live stripes':>18} "
                  f"{'params dense→stripes':>22} {'MACs dense→stripes':>24}")]
        for b in self.before:
            a = after.get(b.node, b)
            kernel = f"{b.kernel[0]}x{b.kernel[1]}" + (
                f"→{a.kernel[0]}x{a.kernel[1]}" if a.kernel != b.kernel else "")
            filters = f"{b.filters}" + (f"→{a.filters}" if a.filters != b.filters else "")
            lines.append(f"{b.node[:28]:<28} {kernel:>9} {filters:>9} "
                         f"{f'{a.live}/{b.stripes}':>18} "
                         f"{f'{b.params_dense}→{a.params_stripes}':>22} "
                         f"{f'{b.macs_dense}→{a.macs_stripes}':>24}")
        lines.append(f"stripe sparsity {self.sparsity:.1%} ({self.stripes - self.live} of "
                     f"{self.stripes} stripes of the group-1 convs dead)")
        lines.append(f"params: {self.params_before} dense → {self.params_after} as exported "
                     f"→ {self.params_stripes} counted by live stripes")
        lines.append(f"MACs:   {self.macs_before} dense → {self.macs_after} as exported "
                     f"→ {self.macs_stripes} counted by live stripes")
        for entry in self.removed_filters:
            lines.append(f"removed filters {entry['channels']} of '{entry['node']}'")
        for entry in self.kept_filters:
            lines.append(f"kept dead filters {entry['channels']} of '{entry['node']}': "
                         f"{entry['reason']}")
        for cut in self.kernel_cuts:
            lines.append(f"'{cut['node']}': kernel {cut['kernel_before']} → {cut['kernel_after']}, "
                         f"pads {cut['pads_before']} → {cut['pads_after']}"
                         + (f", input cropped {cut['crop']}" if any(cut["crop"]) else ""))
        for conv in self.stripe_form:
            lines.append(f"'{conv['node']}': stripe form ({conv['live']} of {conv['stripes']} "
                         f"stripes live, {conv['ranks']} ranks)")
        return "\n".join(lines)


def _stripe_totals(model: ir.Model, layers: list[LayerStripes]) -> tuple[int, int]:
    params, macs = total_params(model), total_macs(model)
    seen: set[str] = set()
    for layer in layers:
        macs -= layer.macs_dense - layer.macs_stripes
        if layer.weight not in seen:  # a weight shared by several convs is counted once
            seen.add(layer.weight)
            params -= layer.params_dense - layer.params_stripes
    return params, macs


# --------------------------------------------------------------------------- dead filters

def _dead_filters(producer) -> np.ndarray:
    """True for each output channel of a producer whose filter is all zero."""
    w = producer.node.inputs[producer.weight].const_value.numpy()
    w = np.moveaxis(w, producer.axis, 0).reshape(w.shape[producer.axis], -1)
    return ~np.any(w != 0, axis=1)


def _read_values(model: ir.Model, values: list[ir.Value], seeds=(0, 1)) -> list[dict]:
    """The values of `values` on random inputs (one dict name → array per seed)."""
    import onnxruntime as ort

    from .validate import random_inputs

    proto = onnx.load_from_string(to_proto_bytes(model))
    present = {o.name for o in proto.graph.output}
    for v in values:
        if v.name not in present:
            elem = v.dtype.value if v.dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, elem, None))
            present.add(v.name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    names = [v.name for v in values]
    results = []
    for seed in seeds:
        feeds = random_inputs(sess, batch=1, seed=seed)
        results.append(dict(zip(names, sess.run(names, feeds), strict=True)))
    return results


def dead_filter_selection(analysis: Analysis, seeds=(0, 1), round_to: int = 1):
    """The selection that removes every dead filter whose removal is exact.

    With `round_to` > 1, a group keeps enough of its dead channels (as zero filters) that
    its channel count stays a multiple of `round_to` where it was one (onnxruntime's
    blocked convolutions want multiples of 8: see README, "Why round to 8").

    Returns (selection, removed, kept): `removed` and `kept` list, per producer, the dead
    output channels that go and those that stay, with the reason.
    """
    roots = analysis.roots
    # Per class root: is every producer filter of it dead? And who produces it.
    dead_class: dict[int, bool] = {}
    for p in analysis.producers:
        for r, d in zip(roots[p.ids].tolist(), _dead_filters(p).tolist(), strict=True):
            dead_class[r] = dead_class.get(r, True) and d
    candidates = {r for r, d in dead_class.items() if d}
    kept_reason: dict[int, str] = {}
    group_of = {int(r): g for g in analysis.groups for r in g.classes}
    for r in list(candidates):
        g = group_of.get(r)
        if g is None or not g.prunable:
            reason = "; ".join(g.frozen) if g is not None and g.frozen else \
                "its group has a single channel"
            kept_reason[r] = f"frozen group: {reason}"
            candidates.discard(r)

    # Exactness: the channel must be zero wherever a layer reads it.
    reads = [read for read in analysis.reads
             if np.isin(roots[np.asarray(read.ids).ravel()], list(candidates)).any()]
    if candidates and reads:
        values = list({id(v): v for v in (read.node.inputs[read.input] for read in reads)}
                      .values())
        runs = _read_values(analysis.model, values, seeds)
        for read in reads:
            data = read.node.inputs[read.input]
            ids = np.asarray(read.ids)
            for run in runs:
                array = run[data.name]
                unknown = ids.ndim != 1 or array.ndim <= read.axis or \
                    array.shape[read.axis] != len(ids)
                for r in set(roots[ids.ravel()].tolist()) & candidates:
                    if unknown:
                        kept_reason[r] = (f"cannot locate the channel in the input of "
                                          f"'{read.node.name}'")
                        candidates.discard(r)
                        continue
                    positions = np.flatnonzero(roots[ids] == r)
                    part = np.take(array, positions, axis=read.axis)
                    if np.any(part != 0):
                        kept_reason[r] = (f"the dead filter's channel carries a nonzero constant "
                                          f"(bias or normalization shift) into "
                                          f"'{read.node.name}' (max |value| "
                                          f"{float(np.abs(part).max()):.3g}); removing it "
                                          "would change the outputs")
                        candidates.discard(r)

    selection = {}
    for g in analysis.groups:
        positions = [k for k, r in enumerate(g.classes.tolist()) if r in candidates]
        if len(positions) >= g.channels:  # a group keeps at least one channel
            r = int(g.classes[positions[-1]])
            kept_reason[r] = "every channel of its group is dead; one is kept"
            positions = positions[:-1]
        if round_to > 1 and g.channels % round_to == 0:
            n = len(positions) - len(positions) % round_to
            for k in positions[n:]:
                kept_reason[int(g.classes[k])] = \
                    f"kept for channel alignment (round_to={round_to})"
            positions = positions[:n]
        if positions:
            selection[g.index] = np.array(positions, dtype=np.int64)

    removed_roots = {int(g.classes[k]) for g in analysis.groups
                     for k in selection.get(g.index, [])}
    removed, kept = [], []
    for p in analysis.producers:
        dead = _dead_filters(p)
        rs = roots[p.ids]
        gone = [c for c in np.flatnonzero(dead).tolist() if int(rs[c]) in removed_roots]
        if gone:
            removed.append({"node": p.node.name, "weight": origin(p.node.inputs[p.weight]),
                            "channels": gone})
        by_reason: dict[str, list[int]] = {}
        for c in np.flatnonzero(dead).tolist():
            if int(rs[c]) in removed_roots:
                continue
            reason = kept_reason.get(int(rs[c]),
                                     "coupled with a live filter (residual add, grouped conv, "
                                     "concatenation...): the channel stays")
            by_reason.setdefault(reason, []).append(c)
        for reason, channels in by_reason.items():
            kept.append({"node": p.node.name, "weight": origin(p.node.inputs[p.weight]),
                         "channels": channels, "reason": reason})
    return selection, removed, kept


# --------------------------------------------------------------------------- kernels

def _border_cuts(dead: np.ndarray) -> tuple[int, int, int, int]:
    """Dead border rows/columns of a kh × kw mask: (top, left, bottom, right)."""
    kh, kw = dead.shape
    if dead.all():
        return 0, 0, 0, 0  # an empty kernel is not a conv: leave it
    top = 0
    while dead[top].all():
        top += 1
    bottom = 0
    while dead[kh - 1 - bottom].all():
        bottom += 1
    left = 0
    while dead[:, left].all():
        left += 1
    right = 0
    while dead[:, kw - 1 - right].all():
        right += 1
    return top, left, bottom, right


def _const_input(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    unique, k = name, 1
    while unique in graph.initializers:
        unique, k = f"{name}_{k}", k + 1
    value = ir.Value(name=unique, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    value.meta[ORIGIN] = unique
    graph.register_initializer(value)
    return value


def shrink_kernels(model: ir.Model) -> list[dict]:
    """Cut dead border rows and columns off every 2-D Conv kernel (in place)."""
    graph = model.graph
    cuts = []
    for node in list(graph):
        w = _conv2d_weight(node)
        if w is None:
            continue
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad not in ("NOTSET", "VALID"):
            continue  # SAME_* pads depend on the input size: left alone
        top, left, bottom, right = _border_cuts(~live_stripes(w).any(axis=0))
        if not (top or left or bottom or right):
            continue
        kh, kw = w.shape[2:]
        pads = list(_attr(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
        dil_h, dil_w = list(_attr(node, "dilations", [1, 1]))
        new = [pads[0] - dil_h * top, pads[1] - dil_w * left,
               pads[2] - dil_h * bottom, pads[3] - dil_w * right]
        crop = [max(0, -p) for p in new]
        new = [max(0, p) for p in new]

        weight = node.inputs[1]
        sliced = np.ascontiguousarray(w[:, :, top:kh - bottom, left:kw - right])
        if len(weight.uses()) == 1 and not weight.is_graph_output():
            weight.const_value = ir.tensor(sliced, name=weight.name)
            weight.shape = ir.Shape(sliced.shape)
        else:
            copy = _const_input(graph, sliced, f"{weight.name}__{node.name}")
            copy.meta[ORIGIN] = origin(weight)
            node.replace_input_with(1, copy)
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", list(sliced.shape[2:]))
        node.attributes["pads"] = ir.AttrInt64s("pads", new)
        node.attributes.pop("auto_pad", None)
        if any(crop):
            axes = [a for a, (lo, hi) in ((2, (crop[0], crop[2])), (3, (crop[1], crop[3])))
                    if lo or hi]
            starts = np.array([crop[a - 2] for a in axes], dtype=np.int64)
            ends = np.array([-crop[a] if crop[a] else _INT64_MAX for a in axes], dtype=np.int64)
            inputs = [node.inputs[0],
                      _const_input(graph, starts, f"{node.name}__stripe_crop_starts"),
                      _const_input(graph, ends, f"{node.name}__stripe_crop_ends"),
                      _const_input(graph, np.array(axes, dtype=np.int64),
                                   f"{node.name}__stripe_crop_axes")]
            crop_node = ir.Node("", "Slice", inputs, num_outputs=1,
                                name=f"{node.name}__stripe_crop")
            crop_node.outputs[0].name = f"{node.name}__stripe_crop_out"
            graph.insert_before(node, crop_node)
            node.replace_input_with(0, crop_node.outputs[0])
        cuts.append({"node": node.name, "weight": origin(node.inputs[1]),
                     "kernel_before": [int(kh), int(kw)], "kernel_after": list(sliced.shape[2:]),
                     "pads_before": pads, "pads_after": new, "crop": crop})
    if cuts:
        clear_intermediate_shapes(model)
        infer_shapes(model)
    return cuts


# --------------------------------------------------------------------------- stripe form

#: When "auto" puts a conv into the stripe form: (minimum input channels per group,
#: minimum stripe sparsity) pairs, any of which suffices. Measured in onnxruntime
#: (benchmarks/swp_form.py; benchmarks/RESULTS.md, "SWP inference form"): the stripe
#: form's extra copies (slices, concat, gathers, sum) outweigh its saved MACs below these;
#: each threshold lies between the sparsities measured slower-or-even and faster.
STRIPE_FORM_RULES: tuple[tuple[int, float], ...] = ((128, 0.65), (64, 0.75), (32, 0.85))
#: ... and only for convs of at least this many dense MACs per sample: the stripe form
#: adds some 15 nodes, whose fixed cost outweighs the saving on a small conv (64→64 3×3
#: on 8×8, 2.4 M MACs, ran slower in a network at batch 1).
STRIPE_FORM_MIN_MACS = 4_000_000


def _stripe_form_conv(graph: ir.Graph, node: ir.Node, w: np.ndarray, live: np.ndarray) -> dict:
    """Replace one Conv (group 1, stride 1) by SWP's stripe form, computing the same output.

    One 1×1 Conv over the live stripes (ordered by kernel offset, plus one zero channel),
    with the conv's pads; per offset (i, j) a Slice of its stripes' channels, shifted by
    (i·dilation, j·dilation); a Concat; per stripe rank t a Gather of the t-th live stripe
    of every filter (the zero channel where a filter has fewer); a Sum with the bias.
    """
    n, c, kh, kw = w.shape
    dil_h, dil_w = list(_attr(node, "dilations", [1, 1]))
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    rows, blocks, per_filter, start = [], [], [[] for _ in range(n)], 0
    for i in range(kh):
        for j in range(kw):
            filters = np.flatnonzero(live[:, i, j])
            if len(filters) == 0:
                continue
            rows.append(w[filters, :, i, j])
            for f, s in zip(filters.tolist(), range(start, start + len(filters)),
                            strict=True):
                per_filter[f].append(s)
            blocks.append((i, j, start, start + len(filters)))
            start += len(filters)
    zero = start
    w1 = np.concatenate([*rows, np.zeros((1, c), w.dtype)])[:, :, None, None]
    name = node.name
    weight = _const_input(graph, np.ascontiguousarray(w1), f"{node.inputs[1].name}__stripes")
    weight.meta[ORIGIN] = origin(node.inputs[1])
    conv = ir.Node("", "Conv", [node.inputs[0], weight], num_outputs=1, name=f"{name}__stripes",
                   attributes=[ir.AttrInt64s("kernel_shape", [1, 1]),
                               ir.AttrInt64s("pads", pads)])
    new_nodes = [conv]
    axes = _const_input(graph, np.array([1, 2, 3], np.int64), f"{name}__stripe_axes")
    parts = []
    for t, (i, j, s0, s1) in enumerate(blocks):
        end = zero + 1 if t == len(blocks) - 1 else s1  # the last block carries the zero channel
        tail_h, tail_w = dil_h * (kh - 1 - i), dil_w * (kw - 1 - j)
        starts = np.array([s0, dil_h * i, dil_w * j], np.int64)
        ends = np.array([end, -tail_h if tail_h else _INT64_MAX,
                         -tail_w if tail_w else _INT64_MAX], np.int64)
        tag = f"{name}__stripe_{i}_{j}"
        piece = ir.Node("", "Slice", [conv.outputs[0],
                                      _const_input(graph, starts, f"{tag}_starts"),
                                      _const_input(graph, ends, f"{tag}_ends"), axes],
                        num_outputs=1, name=tag)
        new_nodes.append(piece)
        parts.append(piece.outputs[0])
    if len(parts) > 1:
        cat = ir.Node("", "Concat", parts, num_outputs=1, name=f"{name}__stripe_concat",
                      attributes=[ir.AttrInt64("axis", 1)])
        new_nodes.append(cat)
        source = cat.outputs[0]
    else:
        source = parts[0]
    ranks = max(len(p) for p in per_filter)
    terms = []
    for t in range(ranks):
        index = np.array([p[t] if t < len(p) else zero for p in per_filter], np.int64)
        gather = ir.Node("", "Gather", [source, _const_input(graph, index,
                                                             f"{name}__stripe_rank{t}")],
                         num_outputs=1, name=f"{name}__stripe_rank{t}",
                         attributes=[ir.AttrInt64("axis", 1)])
        new_nodes.append(gather)
        terms.append(gather.outputs[0])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        if bias.const_value is not None:
            terms.append(_const_input(graph, bias.const_value.numpy().reshape(1, n, 1, 1),
                                      f"{bias.name}__stripes"))
        else:  # a computed bias: reshape it at run time
            shape = _const_input(graph, np.array([1, n, 1, 1], np.int64), f"{name}__bias_shape")
            reshape = ir.Node("", "Reshape", [bias, shape], num_outputs=1,
                              name=f"{name}__stripe_bias")
            new_nodes.append(reshape)
            terms.append(reshape.outputs[0])
    total = ir.Node("", "Sum", terms, num_outputs=1, name=f"{name}__stripe_sum")
    new_nodes.append(total)
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes,
                                            [node.outputs[0]], [total.outputs[0]])
    stripes = int(live.size)
    return {"node": name, "weight": origin(weight), "stripes": stripes, "live": int(live.sum()),
            "sparsity": 1 - float(live.sum()) / stripes, "ranks": ranks}


def stripe_form(model: ir.Model, rules=STRIPE_FORM_RULES,
                min_macs: int = STRIPE_FORM_MIN_MACS) -> list[dict]:
    """Put every eligible Conv of at least `min_macs` dense MACs (per sample) that meets
    one of `rules` ((min input channels per group, min stripe sparsity) pairs) into the
    stripe form (in place). Eligible: 2-D, group 1, stride 1, explicit pads, a kernel
    larger than 1×1, at least one live and one dead stripe."""
    graph = model.graph
    done = []
    costs = node_costs(model) if min_macs > 0 else {}
    for node in list(graph):
        w = _conv2d_weight(node)
        if w is None or int(_attr(node, "group", 1)) != 1 \
                or any(int(s) != 1 for s in _attr(node, "strides", [1, 1])) \
                or w.shape[2] * w.shape[3] == 1:
            continue
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
            continue
        if min_macs > 0 and (node.name not in costs or costs[node.name].macs < min_macs):
            continue
        live = live_stripes(w)
        sparsity = 1 - float(live.mean())
        if live.all() or not live.any() or not any(
                w.shape[1] >= channels and sparsity >= threshold - 1e-9
                for channels, threshold in rules):
            continue
        done.append(_stripe_form_conv(graph, node, w, live))
    if done:
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]
        clear_intermediate_shapes(model)
        infer_shapes(model)
    return done


# --------------------------------------------------------------------------- entry points

FORMS = ("auto", "dense", "stripe")


def prune_stripes(model: ir.Model, *, remove_filters: bool = True, shrink: bool = True,
                  form: str = "auto", rules=STRIPE_FORM_RULES,
                  min_macs: int = STRIPE_FORM_MIN_MACS, round_to: int = 8) -> StripeReport:
    """Remove dead filters and dead kernel borders of a normalized model (in place).

    `form` says how the remaining convs run: "dense" (zero stripes in the K×K weights),
    "stripe" (SWP's stripe form for every eligible conv with a dead stripe), or "auto"
    (the stripe form for the convs of at least `min_macs` MACs that meet one of `rules`,
    where it measured faster; dense elsewhere). Dead filters are removed down to channel counts that stay multiples
    of `round_to` (default 8, where they were: unaligned counts cost onnxruntime more
    than the removed filters save; 1 removes every removable dead filter).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    before = stripe_stats(model)
    params_before, macs_before = total_params(model), total_macs(model)
    removed: list[dict] = []
    kept: list[dict] = []
    surgery = Surgery(model)
    if remove_filters:
        analysis = analyze(model)
        selection, removed, kept = dead_filter_selection(analysis, round_to=round_to)
        if selection:
            try:
                surgery = apply(analysis, selection)
            except UnsupportedModelError as exc:  # refused before any change to the model
                kept = kept + [dict(entry, reason=f"not removable: {exc}") for entry in removed]
                removed = []
    cuts = shrink_kernels(model) if shrink else []
    after = stripe_stats(model)
    params_stripes, macs_stripes = _stripe_totals(model, after)
    converted = []
    if form != "dense":
        converted = stripe_form(model, ((0, 0.0),) if form == "stripe" else rules,
                                0 if form == "stripe" else min_macs)
    return StripeReport(before=before, after=after, params_before=params_before,
                        macs_before=macs_before, params_after=total_params(model),
                        macs_after=total_macs(model), params_stripes=params_stripes,
                        macs_stripes=macs_stripes, removed_filters=removed, kept_filters=kept,
                        kernel_cuts=cuts, stripe_form=converted, slices=surgery.slices,
                        updates=surgery.updates)


def _outputs(model_bytes: bytes, batch: int = 2, seed: int = 0):
    import onnxruntime as ort

    from .validate import random_inputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    feeds = random_inputs(sess, batch=batch, seed=seed)
    return feeds, sess.run(None, feeds)


def prune_stripes_file(source: str | os.PathLike, output: str | os.PathLike, *,
                       verify: bool = True, remove_filters: bool = True, shrink: bool = True,
                       form: str = "auto", rules=STRIPE_FORM_RULES,
                       min_macs: int = STRIPE_FORM_MIN_MACS, round_to: int = 8
                       ) -> StripeReport:
    """Load, prune stripes, check (checker, and onnxruntime against the input), save."""
    import onnxruntime as ort

    model = load_normalized(source)
    original = to_proto_bytes(load_normalized(source)) if verify else None
    report = prune_stripes(model, remove_filters=remove_filters, shrink=shrink, form=form,
                           rules=rules, min_macs=min_macs, round_to=round_to)

    def check(path) -> None:
        onnx.checker.check_model(str(path), full_check=True)
        if original is None:
            return
        feeds, want = _outputs(original)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        got = ort.InferenceSession(str(path), options,
                                   providers=["CPUExecutionProvider"]).run(None, feeds)
        for a, b in zip(want, got, strict=True):
            scale = max(1.0, float(np.abs(a).max(initial=0.0)))
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale):
                raise VerificationError("stripe surgery changed the outputs (internal error); "
                                        "nothing written")
    save_model(model, output, check=check)
    return report


__all__ = ["FORMS", "STRIPE_FORM_MIN_MACS", "STRIPE_FORM_RULES", "LayerStripes", "StripeReport",
           "dead_filter_selection", "live_stripes", "prune_stripes", "prune_stripes_file",
           "shrink_kernels", "stripe_form", "stripe_stats"]
