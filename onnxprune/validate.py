"""onnxruntime checks: the equivalence self-check, output agreement, accuracy, latency."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from .errors import InputError, VerificationError
from .load import copy_origin, load_normalized, model_nbytes, origin, to_proto_bytes, value_axis

_IN_MEMORY_LIMIT = 1_500_000_000


def _ort():
    import onnxruntime as ort
    return ort


def session(model: ir.Model | str | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session with a fixed thread count."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if isinstance(model, ir.Model):
        if model_nbytes(model) < _IN_MEMORY_LIMIT:
            return ort.InferenceSession(to_proto_bytes(model), options,
                                        providers=["CPUExecutionProvider"])
        tmp = Path(tempfile.mkdtemp(prefix="onnxprune-"))
        ir.save(model, tmp / "model.onnx", external_data="model.onnx.data")
        model = tmp / "model.onnx"
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
             "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def random_inputs(sess, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds: the first free dimension is the batch, other free dimensions are 16."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        dims, first = [], True
        for d in arg.shape:
            if isinstance(d, int) and d > 0:
                dims.append(d)
            else:
                dims.append(batch if first else 16)
                first = False
        dtype = _NP_TYPES.get(arg.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[arg.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feeds


def load_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz with array `x` and optional integer labels `y`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such data file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise InputError(f"{path} has no array 'x' (found: {', '.join(data.files)})")
            x = data["x"]
            y = data["y"] if "y" in data else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc.__class__.__name__})") from None
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise InputError(f"{path}: 'y' must be a 1-D label array as long as 'x'")
    return x, y


def check_feed(model: ir.Model, x: np.ndarray) -> None:
    """Refuse data whose shape cannot feed the model's first input (before any work)."""
    arg = model.graph.inputs[0]
    dims = [d if isinstance(d, int) else (d.value or "?") for d in (arg.shape or [])]
    if arg.shape is not None and (len(dims) != x.ndim or any(
            isinstance(d, int) and d != s for d, s in zip(dims[1:], x.shape[1:]))):
        raise InputError(f"data 'x' has shape {list(x.shape)}, but the model's input "
                         f"'{arg.name}' expects {dims}")


def run_batches(sess, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """All outputs for `x` fed to the first input, batch by batch, concatenated."""
    name = sess.get_inputs()[0].name
    dtype = _NP_TYPES.get(sess.get_inputs()[0].type, np.float32)
    parts = [sess.run(None, {name: x[i:i + batch].astype(dtype)}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def zero_slices(model: ir.Model, slices: list[dict]) -> ir.Model:
    """The oracle: set to zero, in a normalized model, the entries a plan slices away."""
    by_origin: dict[str, list[tuple[ir.Node, int, ir.Value]]] = {}
    for node in model.graph:
        for index, v in enumerate(node.inputs):
            if v is not None and v.const_value is not None and not v.is_graph_input():
                by_origin.setdefault(origin(v), []).append((node, index, v))
    for entry in slices:
        uses = by_origin.get(entry["tensor"], [])
        if entry.get("consumer"):
            uses = [u for u in uses if u[0].name == entry["consumer"]]
        if not uses:
            raise VerificationError(f"plan names tensor '{entry['tensor']}', which this model "
                                    "does not have")
        for value in {id(u[2]): u[2] for u in uses}.values():
            shared = [u for u in value.uses() if (u.node, u.idx) not in
                      {(n, i) for n, i, _ in uses}]
            array = value.const_value.numpy().copy()
            index = [slice(None)] * array.ndim
            index[value_axis(value, entry["axis"])] = entry["removed"]
            array[tuple(index)] = 0
            if shared:  # other users keep the original: give ours a zeroed copy
                copy = ir.Value(name=f"{value.name}__zeroed_{len(model.graph.initializers)}",
                                shape=value.shape, type=value.type, const_value=ir.tensor(array))
                copy_origin(copy, value)
                model.graph.register_initializer(copy)
                for node, index_in, v in uses:
                    if v is value:
                        node.replace_input_with(index_in, copy)
                ours = {(n, i) for n, i, v in uses if v is value}
                by_origin[entry["tensor"]] = [(n, i, copy if (n, i) in ours else v)
                                              for n, i, v in by_origin[entry["tensor"]]]
            else:
                value.const_value = ir.tensor(array, name=value.name)
    return model


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return np.array_equal(a, b)
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale, equal_nan=True))


def verify(source: str | os.PathLike, pruned: ir.Model | str | os.PathLike, slices: list[dict],
           threads: int = 1, batch: int = 2, seed: int = 0) -> float:
    """Fail unless the pruned model computes what the original computes with the removed
    entries zeroed. Returns the largest absolute difference seen."""
    reference = session(zero_slices(load_normalized(source), slices), threads)
    candidate = session(pruned, threads)
    feeds = random_inputs(reference, batch=batch, seed=seed)
    expected = reference.run(None, feeds)
    got = candidate.run(None, feeds)
    worst = 0.0
    for out, a, b in zip(reference.get_outputs(), expected, got):
        if not _close(a, b):
            raise VerificationError(
                f"self-check failed: output '{out.name}' of the pruned model differs from the "
                "original with the removed channels zeroed; nothing was written (please report)")
        if np.issubdtype(a.dtype, np.floating) and a.size:
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
    return worst


def check_graph(path: str | os.PathLike, original: str | os.PathLike | None = None,
                what: str = "pruned") -> None:
    """onnx.checker with full_check; if the input itself fails the full check, the output
    is held to the plain check only."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        failure = exc
    if original is not None:
        try:
            onnx.checker.check_model(str(original), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            onnx.checker.check_model(str(path))
            return
    raise VerificationError(f"the {what} model fails onnx.checker: "
                            f"{str(failure).splitlines()[0]}; nothing was written (please report)")


@dataclass
class Agreement:
    max_abs: float
    mean_abs: float
    top1: float | None


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> Agreement:
    a, b = reference[0].astype(np.float64), other[0].astype(np.float64)
    top1 = None
    if a.ndim == 2 and a.shape[1] > 1:
        top1 = float((a.argmax(1) == b.argmax(1)).mean())
    diff = np.abs(a - b)
    return Agreement(float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0, top1)


def topk_accuracy(logits: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def latency(sessions: list, feeds: dict[str, np.ndarray], repeat: int = 30, warmup: int = 5,
            on_step: Callable[[], None] | None = None) -> list[list[float]]:
    """Seconds per run for each session, alternating sessions run by run so that both see
    the same machine conditions."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeat):
        for k, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feeds)
            times[k].append(time.perf_counter() - start)
        if on_step:
            on_step()
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))
