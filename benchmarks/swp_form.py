"""Is SWP's "stripe" inference form faster in onnxruntime than the dense zero-striped conv?

Meng et al. (Pruning Filter in Filter, NeurIPS 2020) run a stripe-pruned K×K conv as
one 1×1 conv over all live stripes (one output channel per live stripe), whose outputs
are then shifted by their kernel offset (i, j) and summed into their filters' output
channels. This script builds, for one Conv layer with a given fraction of dead stripes
(chosen at random among the N·K·K stripes), these ONNX forms and times them:

    dense     the K×K Conv with the dead stripes as zeros (what the exporter emits)
    gather    1×1 Conv (live stripes + one zero channel, input padded by the conv's pads);
              per offset: Gather the N channels of that offset's stripes (the zero
              channel where a filter has no stripe there), Slice the shifted window;
              Sum over offsets (+ bias)
    reduce    1×1 Conv; per offset Slice its stripes' channels and window; Concat;
              Gather into filter order, each filter padded to the largest live count
              r with the zero channel; Reshape (B, N, r, H, W); ReduceSum (+ bias)
    scatter   1×1 Conv; per offset Slice; ScatterElements(reduction="add") into the
              N output channels (static index tensors)

All forms are checked against `dense` before timing. Timing: one process, CPU EP,
ORT_ENABLE_ALL, sequential, fixed intra-op threads, spinning off; per configuration all
sessions are warmed up, then run round-robin (order reshuffled each round, seeded) for
--runs rounds; reported: median ms per run and the ratio to dense.

    python benchmarks/swp_form.py                 # the full table (~5 min on 2 cores)
    python benchmarks/swp_form.py --runs 10 --layers 64x32 --sparsities 0.5   # quick
    python benchmarks/swp_form.py --networks vgg resnet --sparsities 0.5 0.8 0.9  # whole nets
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inits, x_shape, y_shape, name):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def layer(c_in: int, c_out: int, k: int, sparsity: float, seed: int = 0):
    """Random weights and bias with round(sparsity·N·K·K) stripes zeroed."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(c_out)).astype(np.float32)
    stripes = c_out * k * k
    dead = rng.choice(stripes, size=int(round(sparsity * stripes)), replace=False)
    live = np.ones(stripes, dtype=bool)
    live[dead] = False
    live = live.reshape(c_out, k, k)
    w *= live[:, None]
    return w, b, live


def dense_form(w, b, batch, h, wd, pad):
    n, c, k, _ = w.shape
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[pad] * 4,
                              kernel_shape=[k, k])]
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    return _model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
                  [batch, c, h, wd], [batch, n, ho, wo], "dense")


def _stripes(w, live):
    """Live stripes ordered by offset: the 1×1 weight (S+1 rows, last all zero), and per
    offset (i, j) the [start, end) channel range and the filters of those stripes."""
    n, c, k, _ = w.shape
    rows, blocks, start = [], [], 0
    for i in range(k):
        for j in range(k):
            filters = np.flatnonzero(live[:, i, j])
            rows.extend(w[filters, :, i, j])
            blocks.append((i, j, start, start + len(filters), filters))
            start += len(filters)
    rows.append(np.zeros(c, np.float32))
    w1 = np.stack(rows).astype(np.float32)[:, :, None, None]
    return w1, blocks


def _pointwise(w, b, live, h, wd, pad, axes, round_to: int = 1):
    """What the stripe forms share: the stripes as one 1×1 Conv `x -> y1` (its output
    channels padded with zero rows to a multiple of `round_to`; the last is the zero
    channel), the bias and the slice axes. Returns n, ho, wo, blocks, the zero
    channel's index, initializers and nodes."""
    n, _, k, _ = w.shape
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    w1, blocks = _stripes(w, live)
    extra = (-len(w1)) % round_to
    if extra:
        w1 = np.concatenate([w1, np.zeros((extra, *w1.shape[1:]), np.float32)])
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(b.reshape(1, n, 1, 1), "bias"),
             numpy_helper.from_array(np.array(axes, np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[pad] * 4, kernel_shape=[1, 1])]
    return n, ho, wo, blocks, len(w1) - 1, inits, nodes


def gather_form(w, b, live, batch, h, wd, pad):
    c = w.shape[1]
    n, ho, wo, blocks, zero, inits, nodes = _pointwise(w, b, live, h, wd, pad, [2, 3])
    parts = []
    for i, j, s0, s1, filters in blocks:
        if s1 == s0:
            continue
        index = np.full(n, zero, np.int64)
        index[filters] = np.arange(s0, s1)
        tag = f"{i}_{j}"
        inits += [numpy_helper.from_array(index, f"idx{tag}"),
                  numpy_helper.from_array(np.array([i, j], np.int64), f"st{tag}"),
                  numpy_helper.from_array(np.array([i + ho, j + wo], np.int64), f"en{tag}")]
        nodes += [helper.make_node("Gather", ["y1", f"idx{tag}"], [f"g{tag}"], axis=1),
                  helper.make_node("Slice", [f"g{tag}", f"st{tag}", f"en{tag}", "axes"],
                                   [f"p{tag}"])]
        parts.append(f"p{tag}")
    nodes.append(helper.make_node("Sum", [*parts, "bias"], ["y"]))
    return _model(nodes, inits, [batch, c, h, wd], [batch, n, ho, wo], "gather")


def _offset_slices(blocks, n, zero, ho, wo, inits, nodes):
    """One Slice of the 1×1 conv's output `y1` per kernel offset (its stripes' channels
    and the shifted window); the last block also carries the zero channel. Appends to
    `inits` and `nodes`; returns the slice names and each filter's stripe channels."""
    parts, per_filter = [], [[] for _ in range(n)]
    last = max(t for t, blk in enumerate(blocks) if blk[3] > blk[2])
    for t, (i, j, s0, s1, filters) in enumerate(blocks):
        end = zero + 1 if t == last else s1
        if s1 == s0:
            continue
        for f, s in zip(filters, range(s0, s1), strict=True):
            per_filter[f].append(s)
        tag = f"{i}_{j}"
        inits += [numpy_helper.from_array(np.array([s0, i, j], np.int64), f"st{tag}"),
                  numpy_helper.from_array(np.array([end, i + ho, j + wo], np.int64), f"en{tag}")]
        nodes.append(helper.make_node("Slice", ["y1", f"st{tag}", f"en{tag}", "axes"],
                                      [f"p{tag}"]))
        parts.append(f"p{tag}")
    return parts, per_filter


def reduce_form(w, b, live, batch, h, wd, pad):
    c = w.shape[1]
    n, ho, wo, blocks, zero, inits, nodes = _pointwise(w, b, live, h, wd, pad, [1, 2, 3])
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "raxis"))
    parts, per_filter = _offset_slices(blocks, n, zero, ho, wo, inits, nodes)
    r = max(1, max(len(p) for p in per_filter))
    index = np.full((n, r), zero, np.int64)
    for f, stripes in enumerate(per_filter):
        index[f, :len(stripes)] = stripes
    inits += [numpy_helper.from_array(index.ravel(), "order"),
              numpy_helper.from_array(np.array([batch, n, r, ho, wo], np.int64), "shape5")]
    nodes += [helper.make_node("Concat", parts, ["cat"], axis=1),
              helper.make_node("Gather", ["cat", "order"], ["g"], axis=1),
              helper.make_node("Reshape", ["g", "shape5"], ["g5"]),
              helper.make_node("ReduceSum", ["g5", "raxis"], ["s"], keepdims=0),
              helper.make_node("Add", ["s", "bias"], ["y"])]
    return _model(nodes, inits, [batch, c, h, wd], [batch, n, ho, wo], "reduce")


def ranksum_form(w, b, live, batch, h, wd, pad, round_to: int = 1):
    """Like `reduce`, without static shapes: one Gather per stripe rank t (the t-th live
    stripe of every filter, or the zero channel), then Sum over ranks (+ bias). With
    round_to=8 the 1×1 conv gets zero rows up to a multiple of 8 output channels."""
    c = w.shape[1]
    n, ho, wo, blocks, zero, inits, nodes = _pointwise(w, b, live, h, wd, pad, [1, 2, 3],
                                                       round_to)
    parts, per_filter = _offset_slices(blocks, n, zero, ho, wo, inits, nodes)
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    # the blocks are contiguous and the last one runs to the end of y1: `cat` keeps y1's
    # channel indices (zero channel included)
    r = max(1, max(len(p) for p in per_filter))
    terms = []
    for t in range(r):
        index = np.array([p[t] if t < len(p) else zero for p in per_filter], np.int64)
        inits.append(numpy_helper.from_array(index, f"rank{t}"))
        nodes.append(helper.make_node("Gather", ["cat", f"rank{t}"], [f"r{t}"], axis=1))
        terms.append(f"r{t}")
    nodes.append(helper.make_node("Sum", [*terms, "bias"], ["y"]))
    return _model(nodes, inits, [batch, c, h, wd], [batch, n, ho, wo], "ranksum")


def ranksum8_form(w, b, live, batch, h, wd, pad):
    return ranksum_form(w, b, live, batch, h, wd, pad, round_to=8)


def scatter_form(w, b, live, batch, h, wd, pad):
    n, c, k, _ = w.shape
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    w1, blocks = _stripes(w, live)
    acc0 = np.broadcast_to(b.reshape(1, n, 1, 1), (batch, n, ho, wo)).astype(np.float32)
    inits = [numpy_helper.from_array(w1[:-1], "w1"), numpy_helper.from_array(acc0, "acc0"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[pad] * 4, kernel_shape=[1, 1])]
    acc = "acc0"
    for i, j, s0, s1, filters in blocks:
        if s1 == s0:
            continue
        tag = f"{i}_{j}"
        index = np.broadcast_to(filters.reshape(1, -1, 1, 1).astype(np.int64),
                                (batch, len(filters), ho, wo))
        inits += [numpy_helper.from_array(np.ascontiguousarray(index), f"idx{tag}"),
                  numpy_helper.from_array(np.array([s0, i, j], np.int64), f"st{tag}"),
                  numpy_helper.from_array(np.array([s1, i + ho, j + wo], np.int64), f"en{tag}")]
        nodes += [helper.make_node("Slice", ["y1", f"st{tag}", f"en{tag}", "axes"], [f"p{tag}"]),
                  helper.make_node("ScatterElements", [acc, f"idx{tag}", f"p{tag}"],
                                   [f"a{tag}"], axis=1, reduction="add")]
        acc = f"a{tag}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    return _model(nodes, inits, [batch, c, h, wd], [batch, n, ho, wo], "scatter")


FORMS = {"gather": gather_form, "reduce": reduce_form, "ranksum": ranksum_form,
         "ranksum8": ranksum8_form, "scatter": scatter_form}


def session(model, threads):
    """A timing session: all graph optimizations, sequential, no spinning. `model` is a
    ModelProto or a path."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def run_config(c, hw, sparsity, threads, batch, forms, runs, warmup, seed, c_out=None):
    w, b, live = layer(c, c_out or c, 3, sparsity, seed)
    models = {"dense": dense_form(w, b, batch, hw, hw, 1)}
    for name in forms:
        models[name] = FORMS[name](w, b, live, batch, hw, hw, 1)
    sessions = {name: session(m, threads) for name, m in models.items()}
    x = np.random.default_rng(seed).standard_normal((batch, c, hw, hw)).astype(np.float32)
    want = sessions["dense"].run(None, {"x": x})[0]
    for name, sess in sessions.items():
        got = sess.run(None, {"x": x})[0]
        err = float(np.abs(got - want).max())
        assert err < 1e-4 * max(1.0, float(np.abs(want).max())), f"{name}: max |Δ| {err}"
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, {"x": x})
    times = {name: [] for name in sessions}
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(runs):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter_ns()
            sessions[name].run(None, {"x": x})
            times[name].append((time.perf_counter_ns() - t0) / 1e6)
    live_stripes = int(live.sum())
    r = int(live.sum(axis=(1, 2)).max())
    return {"c": c, "c_out": c_out or c, "hw": hw, "sparsity": sparsity, "threads": threads, "batch": batch,
            "live": live_stripes, "r": r,
            "median_ms": {n: statistics.median(t) for n, t in times.items()}}


# --------------------------------------------------------------------------- networks

def _net(kind: str):
    """Small torch CNNs (BN + ReLU after every conv): `vgg` (CIFAR VGG-style, 64-256
    channels on 32×32) and `resnet` (CIFAR ResNet-20-style basic blocks, 16-64 channels)."""
    import torch
    from torch import nn

    def cbr(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    if kind == "vgg":
        layers, cin = [], 3
        for cout in (64, 64, "M", 128, 128, "M", 256, 256, 256):
            if cout == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += cbr(cin, cout)
                cin = cout
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*cbr(cin, cout, stride)[:3],
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout))
            self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    blocks, cin = [], 16
    for cout, stride in ((16, 1), (16, 1), (16, 1), (32, 2), (32, 1), (32, 1),
                         (64, 2), (64, 1), (64, 1)):
        blocks.append(Block(cin, cout, stride))
        cin = cout
    return nn.Sequential(*cbr(3, 16), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


#: The export settings compared on whole networks: "keep" is the dense zero-striped export
#: with every filter kept; "8": dead filters removed only down to channel counts that are
#: multiples of 8.
NET_FORMS = {"dense": {"form": "dense", "round_to": 1},
             "keep": {"form": "dense", "remove_filters": False},
             "dense8": {"form": "dense", "round_to": 8},
             "auto": {"form": "auto", "round_to": 1},
             "auto8": {"form": "auto", "round_to": 8},          # the export default
             "stripe": {"form": "stripe", "round_to": 1}}


def run_network(kind, sparsity, threads_list, batches, runs, warmup, seed, workdir):
    """Export one network with `sparsity` of every conv's stripes dead (at random) in the
    dense, auto and stripe forms; time each (same round-robin as above)."""
    import sys
    import warnings
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from onnxprune.adapters.torch.swp import FilterSkeleton, export

    torch.manual_seed(seed)
    model = _net(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs = FilterSkeleton(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fs.layers.values():
            f = layer.fs
            dead = torch.randperm(f.numel(), generator=g)[:round(sparsity * f.numel())]
            f.view(-1)[dead] = 0
    fs.after_step()
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    paths, reports = {}, {}
    for name, kwargs in NET_FORMS.items():
        paths[name] = Path(workdir) / f"{kind}_{int(sparsity * 100)}_{name}.onnx"
        reports[name] = export(fs, x, paths[name], **kwargs)
    rows = []
    for threads in threads_list:
        for batch in batches:
            sessions = {form: session(path, threads) for form, path in paths.items()}
            feed = {"input": np.random.default_rng(seed).standard_normal(
                (batch, 3, 32, 32)).astype(np.float32)}
            want = sessions["dense"].run(None, feed)[0]
            for form, sess in sessions.items():
                assert np.allclose(sess.run(None, feed)[0], want, rtol=1e-3, atol=1e-4), form
                for _ in range(warmup):
                    sess.run(None, feed)
            times = {form: [] for form in sessions}
            order = list(sessions)
            rng = random.Random(seed)
            for _ in range(runs):
                rng.shuffle(order)
                for form in order:
                    t0 = time.perf_counter_ns()
                    sessions[form].run(None, feed)
                    times[form].append((time.perf_counter_ns() - t0) / 1e6)
            rows.append({"net": kind, "sparsity": sparsity, "threads": threads, "batch": batch,
                         "measured_sparsity": reports["dense"].sparsity,
                         "removed_filters": sum(len(e["channels"])
                                                for e in reports["dense"].removed_filters),
                         "filters": sum(layer.filters for layer in reports["dense"].before),
                         "auto_convs": len(reports["auto"].stripe_form),
                         "convs": len(reports["dense"].after),
                         "median_ms": {f: statistics.median(t) for f, t in times.items()}})
    return rows


def main_network(args):
    import tempfile

    print(f"# networks; onnxruntime {ort.__version__}, runs={args.runs}", flush=True)
    others = [f for f in NET_FORMS if f != "dense"]
    print("| net | stripe sparsity | dead filters removed | threads | batch | "
          "convs in stripe form (auto) | dense ms | "
          + " | ".join(f"{f} ms (×dense)" for f in others) + " |")
    print("|" + "---|" * (7 + len(others)))
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.networks:
            for sparsity in args.sparsities:
                for row in run_network(kind, sparsity, args.threads, args.batches, args.runs,
                                       args.warmup, args.seed, workdir):
                    results.append(row)
                    med = row["median_ms"]
                    cells = " | ".join(f"{med[f]:.3f} ({med[f] / med['dense']:.2f})"
                                       for f in others)
                    print(f"| {kind} | {sparsity:.0%} | {row['removed_filters']}/{row['filters']} "
                          f"| {row['threads']} | {row['batch']} | "
                          f"{row['auto_convs']}/{row['convs']} | {med['dense']:.3f} | {cells} |",
                          flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="+", default=["64x32", "64x56", "128x28"],
                    help="CxHW (C→C) or CIN:COUTxHW: a 3×3 conv, pad 1, on HW×HW")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--networks", nargs="+", choices=["vgg", "resnet"],
                    help="time whole networks exported by onnxprune.adapters.torch.swp.export "
                         "in the dense, auto and stripe forms instead of single layers")
    args = ap.parse_args(argv)
    if args.networks:
        return main_network(args)

    print(f"# onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"runs={args.runs}", flush=True)
    header = "| layer | stripe sparsity | threads | batch | dense ms | " + \
        " | ".join(f"{f} ms (×dense)" for f in args.forms) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = []
    for spec in args.layers:
        channels, hw = spec.split("x")
        c, c_out = (int(v) for v in channels.split(":")) if ":" in channels else \
            (int(channels), int(channels))
        hw = int(hw)
        for sparsity in args.sparsities:
            for threads in args.threads:
                for batch in args.batches:
                    res = run_config(c, hw, sparsity, threads, batch, args.forms, args.runs,
                                     args.warmup, args.seed, c_out)
                    results.append(res)
                    med = res["median_ms"]
                    cells = " | ".join(f"{med[f]:.3f} ({med[f] / med['dense']:.2f})"
                                       for f in args.forms)
                    print(f"| {c}→{c_out} 3×3 @ {hw}×{hw} | {sparsity:.0%} | {threads} | {batch} | "
                          f"{med['dense']:.3f} | {cells} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
