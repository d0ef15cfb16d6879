"""Write a large synthetic VGG-like ONNX model whose weights live in one
external data file (default: ~1.73 GB of float32 weights).

Graph (opset 17, input ``input`` [N,3,224,224] with dynamic N, output
``output`` [N,classes]):

    VGG-16 conv stack (13x Conv3x3+bias -> Relu, 5x MaxPool 2x2)
    -> Flatten -> fc1 Gemm(transB=1) 25088 -> F1 -> Relu
               -> fc2 MatMul(W[F1,F2]) + Add(bias) -> Relu
               -> fc3 Gemm(transB=1) F2 -> classes

Default F1=12288, F2=8192, classes=1000. fc2 deliberately uses MatMul+Add
(weight stored [in, out]) while fc1/fc3 use Gemm (weight stored [out, in],
PyTorch layout), so a pruner sees both patterns.

Streaming (default): every tensor is generated in row chunks of at most
``--chunk-mb`` and appended straight to ``<stem>.data``; the ModelProto only
holds ``external_data`` references (location/offset/length), so the process
never holds more than one chunk of weights. Offsets are aligned to 64 KiB
(onnxruntime can then mmap the file). The result is the same layout that
``onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True,
location="<stem>.data")`` produces; ``--in-memory`` builds it that way instead
(holds every weight in RAM; useful as a cross-check only).

Examples::

    python benchmarks/make_big_model.py                       # -> benchmarks/_work/big_vgg.onnx + big_vgg.data
    python benchmarks/make_big_model.py --verify              # + onnx.checker and one onnxruntime run (peak RSS each)
    python benchmarks/make_big_model.py --fc 16384,16384 -o benchmarks/_work/huge.onnx   # > 2 GB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "_work", "big_vgg.onnx")
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
ALIGN = 64 * 1024


def _maxrss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class ExternalDataWriter:
    """Appends tensors to one external data file and returns TensorProtos
    that reference them."""

    def __init__(self, data_path: str, location: str, align: int = ALIGN):
        self.f = open(data_path, "wb")
        self.location = location
        self.align = align
        self.offset = 0

    def _pad(self):
        rem = self.offset % self.align
        if rem:
            self.f.write(b"\0" * (self.align - rem))
            self.offset += self.align - rem

    def add(self, name: str, shape: tuple[int, ...], chunks) -> TensorProto:
        """``chunks`` yields float32 arrays whose concatenation (C order) is
        the tensor."""
        self._pad()
        start = self.offset
        n = 0
        for c in chunks:
            c = np.ascontiguousarray(c, dtype="<f4")
            self.f.write(c.tobytes(order="C"))
            n += c.size
        expected = int(np.prod(shape, dtype=np.int64))
        assert n == expected, (name, n, expected)
        length = n * 4
        self.offset += length
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(start)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def close(self):
        self.f.close()


def _random_chunks(rng: np.random.Generator, shape, std: float, chunk_elems: int):
    """Row-chunked N(0, std^2) float32 along axis 0."""
    rows = shape[0]
    row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    rows_per_chunk = max(1, chunk_elems // max(1, row_elems))
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        a = rng.standard_normal((r1 - r0) * row_elems, dtype=np.float32)
        a *= np.float32(std)
        yield a


def layer_plan(fc=(12288, 8192), classes=1000, cfg=VGG16_CFG, image=224):
    """List of (kind, name, weight_shape, bias_shape, fan_in) + conv/pool ops."""
    plan = []
    c_in, hw, ci = 3, image, 0
    for v in cfg:
        if v == "M":
            plan.append(("pool", f"pool{len([p for p in plan if p[0] == 'pool'])}", None, None, None))
            hw //= 2
        else:
            plan.append(("conv", f"conv{ci}", (v, c_in, 3, 3), (v,), c_in * 9))
            c_in, ci = v, ci + 1
    flat = c_in * hw * hw
    f1, f2 = fc
    plan.append(("gemm", "fc1", (f1, flat), (f1,), flat))
    plan.append(("matmul", "fc2", (f1, f2), (f2,), f1))
    plan.append(("gemm", "fc3", (classes, f2), (classes,), f2))
    return plan, flat


def build(out_path: str, fc=(12288, 8192), classes=1000, seed=0, chunk_mb=64, in_memory=False,
          opset=17) -> dict:
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    stem = os.path.splitext(os.path.basename(out_path))[0]
    location = f"{stem}.data"
    data_path = os.path.join(os.path.dirname(out_path), location)
    for p in (out_path, data_path):
        if os.path.exists(p):
            os.remove(p)

    plan, flat = layer_plan(fc, classes)
    chunk_elems = max(1, chunk_mb * 1024 * 1024 // 4)
    writer = None if in_memory else ExternalDataWriter(data_path, location)
    inits: list[TensorProto] = []
    nodes = []
    n_params = 0

    def add_tensor(name, shape, std, idx):
        nonlocal n_params
        n_params += int(np.prod(shape, dtype=np.int64))
        rng = np.random.default_rng([seed, idx])
        chunks = _random_chunks(rng, shape, std, chunk_elems)
        if writer is not None:
            inits.append(writer.add(name, tuple(shape), chunks))
        else:
            arr = np.concatenate(list(chunks)).reshape(shape)
            inits.append(onnx.numpy_helper.from_array(arr, name))

    x = "input"
    t_idx = 0
    for kind, name, wshape, bshape, fan_in in plan:
        if kind == "pool":
            y = f"{name}_out"
            nodes.append(helper.make_node("MaxPool", [x], [y], name=name, kernel_shape=[2, 2], strides=[2, 2]))
            x = y
            continue
        if kind == "gemm" and name == "fc1":
            nodes.append(helper.make_node("Flatten", [x], ["flatten_out"], name="flatten", axis=1))
            x = "flatten_out"
        w, b = f"{name}.weight", f"{name}.bias"
        add_tensor(w, wshape, float(np.sqrt(2.0 / fan_in)), t_idx)
        add_tensor(b, bshape, 0.01, t_idx + 1)
        t_idx += 2
        last = name == "fc3"
        y = "output" if last else f"{name}_out"
        if kind == "conv":
            nodes.append(helper.make_node("Conv", [x, w, b], [y], name=name, kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1], strides=[1, 1]))
        elif kind == "gemm":
            nodes.append(helper.make_node("Gemm", [x, w, b], [y], name=name, transB=1))
        else:  # matmul + add
            nodes.append(helper.make_node("MatMul", [x, w], [f"{name}_mm"], name=f"{name}_matmul"))
            nodes.append(helper.make_node("Add", [f"{name}_mm", b], [y], name=f"{name}_add"))
        if not last:
            r = f"{name}_relu"
            nodes.append(helper.make_node("Relu", [y], [r], name=r))
            x = r
    if writer is not None:
        writer.close()

    graph = helper.make_graph(
        nodes, f"{stem}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxprune-benchmarks/make_big_model")
    model.ir_version = 8  # opset 17 <-> IR 8; keeps older runtimes happy
    if writer is not None:
        onnx.save_model(model, out_path)
    else:
        onnx.save_model(model, out_path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=0, convert_attribute=False)
    return {
        "model": out_path,
        "data": data_path,
        "params": n_params,
        "weight_bytes": n_params * 4,
        "onnx_bytes": os.path.getsize(out_path),
        "data_bytes": os.path.getsize(data_path),
        "flatten_features": flat,
        "fc": list(fc),
    }


# --------------------------------------------------------------------------
# verification (each step in its own child process -> its own peak RSS)
# --------------------------------------------------------------------------
def _child_check(path: str):
    t = time.perf_counter()
    onnx.checker.check_model(path, full_check=True)  # path-based: works > 2 GB
    print(json.dumps({"step": "onnx.checker(path, full_check)", "seconds": time.perf_counter() - t}))


def _child_ort(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    y = sess.run(None, {"input": x})[0]
    t2 = time.perf_counter()
    print(json.dumps({
        "step": f"onnxruntime {ort.__version__} load+run [1,3,224,224] (intra_op={threads})",
        "load_s": t1 - t0, "run_s": t2 - t1, "out_shape": list(y.shape),
        "finite": bool(np.isfinite(y).all()), "out_std": float(y.std()),
    }))


def _run_child(args: list[str]) -> tuple[dict, float | None, str]:
    """Run this script in a child; peak RSS via run_e2e.measure (GNU time if
    available: os.wait4 on a child of this process would report at least this
    process's own RSS, see run_e2e.py)."""
    sys.path.insert(0, HERE)
    from run_e2e import measure

    r = measure([sys.executable, os.path.abspath(__file__), *args])
    if r.rc != 0:
        raise SystemExit(f"child {args} failed with {r.rc}:\n{r.stdout_tail}\n{r.stderr_tail}")
    info = json.loads(r.stdout_tail.strip().splitlines()[-1])
    return info, r.peak_rss_mb, r.method


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=DEFAULT_OUT, help=f"model path (default {DEFAULT_OUT})")
    ap.add_argument("--fc", default="12288,8192", help="hidden widths of fc1,fc2 (default 12288,8192)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-mb", type=int, default=64, help="max MB of weights generated at once")
    ap.add_argument("--in-memory", action="store_true",
                    help="build all weights in RAM and use onnx.save_model(save_as_external_data=True)")
    ap.add_argument("--verify", action="store_true",
                    help="run onnx.checker (path-based) and one onnxruntime inference, each in a child process")
    ap.add_argument("--verify-only", action="store_true", help="skip building; verify an existing model")
    ap.add_argument("--threads", type=int, default=2, help="intra_op_num_threads for the ORT check")
    ap.add_argument("--_child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        kind, path = args._child
        if kind == "check":
            _child_check(path)
        else:
            _child_ort(path, args.threads)
        return

    if not args.verify_only:
        fc = tuple(int(v) for v in args.fc.split(","))
        assert len(fc) == 2, "--fc takes two widths"
        t = time.perf_counter()
        info = build(args.output, fc=fc, classes=args.classes, seed=args.seed, chunk_mb=args.chunk_mb,
                     in_memory=args.in_memory)
        info["build_s"] = round(time.perf_counter() - t, 2)
        info["build_peak_rss_mb"] = round(_maxrss_mb_self(), 1)
        info["mode"] = "in-memory" if args.in_memory else "streaming"
        print(f"wrote {info['model']} ({info['onnx_bytes'] / 1e3:.1f} kB) + {info['data']} "
              f"({info['data_bytes'] / 1e9:.3f} GB)")
        print(f"  params={info['params']:,}  weights={info['weight_bytes'] / 1e9:.3f} GB "
              f"({info['weight_bytes'] / 2**30:.3f} GiB)  build={info['build_s']} s  "
              f"builder peak RSS={info['build_peak_rss_mb']:.0f} MiB ({info['mode']})")

    if args.verify or args.verify_only:
        path = os.path.abspath(args.output)
        ck, ck_rss, how = _run_child(["--_child", "check", path])
        print(f"  {ck['step']}: ok in {ck['seconds']:.1f} s, child peak RSS={ck_rss:.0f} MiB ({how})")
        rt, rt_rss, how = _run_child(["--threads", str(args.threads), "--_child", "ort", path])
        print(f"  {rt['step']}: load {rt['load_s']:.1f} s, run {rt['run_s']:.2f} s, out {rt['out_shape']}, "
              f"finite={rt['finite']}, std={rt['out_std']:.3g}; child peak RSS={rt_rss:.0f} MiB ({how})")


if __name__ == "__main__":
    main()
