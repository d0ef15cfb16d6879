"""How much does onnxruntime CPU latency depend on channel counts being
multiples of 4 / 8 / 16?  (Evidence for onnxprune's ``round-to`` default.)

For each model (default: MobileNetV2 and ResNet-18, torchvision layouts from
models.py) five variants are exported (TorchScript exporter, opset 17, BN
folded, dynamic batch):

    orig    original widths
    floor   every width w -> floor(w * SCALE)            (unaligned pruning)
    r4/r8/r16  floor(w * SCALE) rounded to the nearest multiple of 4/8/16
               (ties up, at least one multiple, never above w)

Every settable width is scaled: residual streams, block-internal widths,
MobileNetV2 expansion (hidden/depthwise) widths, stem and last conv; network
input (3) and classes (1000) stay.

MACs are counted from the ONNX graph (Conv: N*Cout*Ho*Wo*Cin/g*kh*kw,
Gemm/MatMul: M*K*N, batch 1). "nchwc" is how many Conv nodes onnxruntime's
NCHWc layout transformer took (ORT_ENABLE_ALL; on x86 it needs channel
counts that are multiples of the MLAS NCHWc block: 8 with AVX2, 16 with
AVX-512; other convs fall back to im2col+SGEMM).

Timing: one process, onnxruntime CPU EP, ORT_ENABLE_ALL, sequential
execution, fixed intra_op_num_threads (each value in --threads),
inter_op_num_threads=1, intra-op spinning off by default (so idle sessions'
spinning workers don't steal the other core in the round-robin), for each
batch size in --batches: all sessions are warmed up, then run round-robin
(order reshuffled each round, seeded) for --runs rounds; one sample = one
session.run(). Reported: median and IQR, ratio to the same model's orig.

    python benchmarks/alignment.py                       # default run (~3-4 min on 2 shared cores)
    python benchmarks/alignment.py --runs 10 --batches 1 # quick look
    python benchmarks/alignment.py --models resnet50 --batches 1 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKDIR = os.path.join(HERE, "_work", "alignment")


def variant_specs(scale: float, round_tos: list[int], mode: str) -> list[tuple[str, dict]]:
    specs = [("orig", {}), ("floor", {"channel_scale": scale, "round_to": 1})]
    for r in round_tos:
        specs.append((f"r{r}", {"channel_scale": scale, "round_to": r, "round_mode": mode}))
    return specs


# --------------------------------------------------------------------------
# phase 1: export (child process; the timing process never imports torch)
# --------------------------------------------------------------------------
def export_all(models: list[str], specs: list[tuple[str, dict]], outdir: str, force: bool) -> None:
    sys.path.insert(0, HERE)
    import torch

    from models import build_model, export_onnx

    torch.set_num_threads(1)
    os.makedirs(outdir, exist_ok=True)
    for name in models:
        for vname, kw in specs:
            path = os.path.join(outdir, f"{name}_{vname}.onnx")
            meta_path = path + ".json"
            model = build_model(name, seed=0, **kw)
            widths = dict(model.widths)
            if not force and os.path.exists(path) and os.path.exists(meta_path):
                with open(meta_path) as f:
                    if json.load(f).get("widths") == widths:
                        continue
            t = time.perf_counter()
            export_onnx(model, path)
            with open(meta_path, "w") as f:
                json.dump({"model": name, "variant": vname, "kwargs": kw, "widths": widths}, f)
            print(f"[export] {os.path.relpath(path)}  ({time.perf_counter() - t:.1f} s)", flush=True)


# --------------------------------------------------------------------------
# static analysis
# --------------------------------------------------------------------------
def count_macs(path: str) -> tuple[int, int]:
    """(MACs at batch 1, parameter count) from the ONNX graph."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(path)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    params = sum(int(_prod(d)) for d in inits.values())
    for inp in m.graph.input:  # pin dynamic batch to 1
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                d.Clear()
                d.dim_value = 1
    m = shape_inference.infer_shapes(m)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    shapes.update(inits)
    macs = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            w = shapes[n.input[1]]  # [Cout, Cin/g, kh, kw]
            y = shapes[n.output[0]]  # [N, Cout, Ho, Wo]
            macs += _prod(y) * _prod(w[1:])
        elif n.op_type in ("Gemm", "MatMul"):
            a, y = shapes[n.input[0]], shapes[n.output[0]]
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a else a[-1]
            macs += _prod(y) * k
    return int(macs), int(params)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def nchwc_coverage(ort, path: str, threads: int) -> tuple[int, int]:
    """(#NchwcConv, #conv-like nodes) in onnxruntime's optimized graph."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = os.path.join(td, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        ops = [(n.domain, n.op_type) for n in g.node]
    # NCHWc convs live in domain com.microsoft.nchwc (op_type "Conv"); the
    # rest stay ai.onnx Conv or become com.microsoft FusedConv.
    nchwc = ops.count(("com.microsoft.nchwc", "Conv"))
    plain = ops.count(("", "Conv")) + ops.count(("ai.onnx", "Conv")) + ops.count(("com.microsoft", "FusedConv"))
    return nchwc, nchwc + plain


def probe_nchwc(ort, cases=None) -> list[tuple]:
    """Which single-Conv shapes does this onnxruntime build run as NCHWc, and
    with what (padded) weight shape? -> [(cin, cout, group, k, nchwc?, weight dims)]"""
    import tempfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cases = cases or [(16, 16, 1, 1), (16, 20, 1, 1), (20, 16, 1, 1), (20, 20, 1, 3), (16, 18, 1, 1),
                      (18, 16, 1, 1), (17, 16, 1, 1), (3, 19, 1, 3), (12, 12, 1, 1), (24, 24, 24, 3),
                      (20, 20, 20, 3), (18, 18, 18, 3), (32, 32, 2, 3), (40, 40, 2, 3)]
    out = []
    with tempfile.TemporaryDirectory() as td:
        for cin, cout, group, k in cases:
            w = numpy_helper.from_array(np.ones((cout, cin // group, k, k), np.float32), "w")
            g = helper.make_graph(
                [helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[k // 2] * 4)], "g",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 32, 32])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 32, 32])], [w])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
            m.ir_version = 8
            src, dst = os.path.join(td, "p.onnx"), os.path.join(td, "p_opt.onnx")
            onnx.save(m, src)
            so = ort.SessionOptions()
            so.optimized_model_filepath = dst
            so.log_severity_level = 3
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            og = onnx.load(dst).graph
            conv = [n for n in og.node if n.op_type in ("Conv", "FusedConv")][0]
            out.append((cin, cout, group, k, conv.domain == "com.microsoft.nchwc",
                        [list(t.dims) for t in og.initializer if len(t.dims) == 4][0]))
    return out


# --------------------------------------------------------------------------
# phase 2: timing
# --------------------------------------------------------------------------
def make_session(ort, path: str, threads: int, spinning: bool):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def bench_config(ort, np, entries, threads: int, batch: int, runs: int, warmup: int, spinning: bool,
                 seed: int) -> dict:
    sessions = {}
    for e in entries:
        sessions[e["key"]] = make_session(ort, e["path"], threads, spinning)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    feeds = {"input": x}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds)
    times = {k: [] for k in sessions}
    order = list(sessions)
    rng = random.Random(seed)
    t_cfg = time.perf_counter()
    for _ in range(runs):
        rng.shuffle(order)
        for k in order:
            s = sessions[k]
            t0 = time.perf_counter_ns()
            s.run(None, feeds)
            times[k].append((time.perf_counter_ns() - t0) / 1e6)
    elapsed = time.perf_counter() - t_cfg
    del sessions
    return {"times_ms": times, "elapsed_s": elapsed}


def _q(xs, q):
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
                                    if x in fl)
    except OSError:
        pass
    return ""


def render(rows: list[dict], meta: dict, md_path: str | None):
    headers = ["model", "round-to", "MACs (M)", "MACs ratio", "nchwc convs", "threads", "batch",
               "median ms", "IQR ms", "latency ratio", "lat/MACs"]

    def fmt(r):
        return [r["model"], r["variant"], f"{r['macs'] / 1e6:.0f}", f"{r['macs_ratio']:.3f}",
                f"{r['nchwc']}/{r['convs']}", str(r["threads"]), str(r["batch"]), f"{r['median_ms']:.2f}",
                f"{r['q25_ms']:.2f}-{r['q75_ms']:.2f}", f"{r['lat_ratio']:.3f}", f"{r['lat_ratio'] / r['macs_ratio']:.2f}"]

    body = [fmt(r) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="onnxruntime CPU latency vs channel alignment", show_lines=False)
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i < 2 else "right")
        prev = None
        for r, b in zip(rows, body):
            cur = (r["threads"], r["batch"], r["model"])
            if prev is not None and cur != prev:
                t.add_section()
            prev = cur
            t.add_row(*b)
        Console(width=None if sys.stdout.isatty() else 160).print(t)
    except ImportError:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    md = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md += ["| " + " | ".join(b) + " |" for b in body]
    print("\n".join(md))
    if md_path:
        with open(md_path, "w") as f:
            f.write(f"<!-- {json.dumps(meta)} -->\n" + "\n".join(md) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2,resnet18", help="comma list from models.MODELS")
    ap.add_argument("--scale", type=float, default=0.62, help="width multiplier applied to every layer")
    ap.add_argument("--round-to", default="4,8,16", help="alignments to compare against floor/orig")
    ap.add_argument("--round-mode", default="nearest", choices=["nearest", "up", "down"])
    ap.add_argument("--threads", default="1,2", help="intra_op_num_threads values")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=30, help="timed round-robin rounds per config (median over these)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--spinning", action="store_true", help="allow ORT intra-op spin-waiting (default off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--force-export", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="raw samples + summary as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the markdown table here too")
    ap.add_argument("--probe-nchwc", action="store_true",
                    help="only report which single-Conv channel counts get NCHWc kernels (and padding)")
    ap.add_argument("--_export-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    round_tos = [int(r) for r in args.round_to.split(",") if r.strip()]
    specs = variant_specs(args.scale, round_tos, args.round_mode)

    if args._export_only:
        export_all(models, specs, args.workdir, args.force_export)
        return

    if args.probe_nchwc:
        import onnxruntime as ort

        print(f"onnxruntime {ort.__version__}, cpu '{cpu_model()}' ({cpu_flags()})")
        print("cin  cout group k  nchwc  weight-as-run")
        for cin, cout, grp, k, ok, dims in probe_nchwc(ort):
            print(f"{cin:<4d} {cout:<4d} {grp:<5d} {k:<2d} {'yes' if ok else 'no ':5s}  {dims}")
        return

    t_start = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--_export-only", "--models", ",".join(models),
           "--scale", str(args.scale), "--round-to", args.round_to, "--round-mode", args.round_mode,
           "--workdir", args.workdir] + (["--force-export"] if args.force_export else [])
    subprocess.run(cmd, check=True)
    t_export = time.perf_counter() - t_start

    import numpy as np
    import onnxruntime as ort

    threads_list = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    entries = []
    for name in models:
        for vname, _kw in specs:
            path = os.path.join(args.workdir, f"{name}_{vname}.onnx")
            with open(path + ".json") as f:
                widths = json.load(f)["widths"]
            macs, params = count_macs(path)
            nchwc, convs = nchwc_coverage(ort, path, 1)
            aligned8 = sum(1 for w in widths.values() if w % 8 == 0)
            entries.append({"key": f"{name}/{vname}", "model": name, "variant": vname, "path": path,
                            "macs": macs, "params": params, "nchwc": nchwc, "convs": convs,
                            "widths": widths, "aligned8": f"{aligned8}/{len(widths)}"})
    base = {e["model"]: e for e in entries if e["variant"] == "orig"}
    for e in entries:
        print(f"[info] {e['key']:22s} MACs={e['macs'] / 1e6:8.1f}M params={e['params'] / 1e6:6.2f}M "
              f"NchwcConv {e['nchwc']}/{e['convs']}  widths%8==0: {e['aligned8']}")

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "nproc": os.cpu_count(),
        "onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "scale": args.scale, "round_mode": args.round_mode, "runs": args.runs, "warmup": args.warmup,
        "spinning": args.spinning, "load_avg_start": os.getloadavg(),
    }
    print(f"[info] {meta}", flush=True)

    rows, raw = [], {}
    for threads in threads_list:
        for batch in batches:
            res = bench_config(ort, np, entries, threads, batch, args.runs, args.warmup, args.spinning,
                               args.seed + 1000 * threads + batch)
            print(f"[bench] threads={threads} batch={batch}: {args.runs} rounds in {res['elapsed_s']:.1f} s, "
                  f"loadavg={os.getloadavg()[0]:.2f}", flush=True)
            med = {k: statistics.median(v) for k, v in res["times_ms"].items()}
            for e in entries:
                ts = res["times_ms"][e["key"]]
                b = base[e["model"]]
                rows.append({
                    "model": e["model"], "variant": e["variant"], "threads": threads, "batch": batch,
                    "macs": e["macs"], "macs_ratio": e["macs"] / b["macs"], "params": e["params"],
                    "nchwc": e["nchwc"], "convs": e["convs"],
                    "median_ms": med[e["key"]], "q25_ms": _q(ts, 0.25), "q75_ms": _q(ts, 0.75),
                    "lat_ratio": med[e["key"]] / med[b["key"]],
                })
                raw[f"{e['key']}/t{threads}/b{batch}"] = ts
    meta["load_avg_end"] = os.getloadavg()
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    meta["export_s"] = round(t_export, 1)
    rows.sort(key=lambda r: (r["threads"], r["batch"], models.index(r["model"])))
    print()
    render(rows, meta, args.markdown)
    print(f"\n[info] date={meta['date']} cpu='{meta['cpu']}' ({meta['cpu_flags']}) nproc={meta['nproc']} "
          f"onnxruntime={meta['onnxruntime']} total={meta['total_s']} s (export {meta['export_s']} s) "
          f"loadavg start={meta['load_avg_start']} end={meta['load_avg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "entries": entries, "samples_ms": raw}, f, indent=1)


if __name__ == "__main__":
    main()
