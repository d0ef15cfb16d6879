"""The evaluation stage: cost, accuracy, agreement and latency of one model or two.

    onnxprune eval MODEL [OTHER] [--data val.npz]

Works on any ONNX model (pruned by this tool or not, with or without external data).
With two models, OTHER is compared against MODEL: output agreement, and the latency
ratio OTHER / MODEL measured with the two sessions alternating run by run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from . import validate
from .errors import InputError, UsageError
from .load import load_normalized
from .metrics import total_macs, total_params
from .report import _count, agreement_line

Progress = Callable[[str, int], Callable[[], None]]


@dataclass
class EvalOptions:
    """How to evaluate; the `onnxprune eval` flags, one for one."""

    data: str | None = None      # .npz with x and optional integer labels y
    threads: int = 1
    batch: int = 1               # latency batch size
    repeat: int = 30             # timed runs per model
    warmup: int = 5
    seed: int = 0
    eval_batch: int = 64         # batch size for accuracy/agreement passes

    def check(self) -> None:
        for name in ("threads", "batch", "repeat", "eval_batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0:
            raise UsageError("--warmup must be at least 0")


def _no_progress(_label: str, _total: int) -> Callable[[], None]:
    return lambda: None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _session(path: str, threads: int):
    """onnxruntime session on the file itself (external data is resolved beside it)."""
    try:
        return validate.session(path, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception classes
        raise InputError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None


def _fixed(d) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _fixed_batch(sess) -> int | None:
    shape = sess.get_inputs()[0].shape
    return _fixed(shape[0]) if shape else None


def _shapes_conflict(a: list, b: list) -> bool:
    """Two onnxruntime shapes (ints, names or None) that cannot describe the same tensor."""
    if not a or not b:  # unknown
        return False
    if len(a) != len(b):
        return True
    return any(_fixed(x) is not None and _fixed(y) is not None and x != y
               for x, y in zip(a, b, strict=True))


def _check_compatible(path_a: str, sess_a, path_b: str, sess_b) -> None:
    """Refuse a second model that cannot take the same feeds or whose first output differs."""
    ins_a = {i.name: i for i in sess_a.get_inputs()}
    ins_b = {i.name: i for i in sess_b.get_inputs()}
    if set(ins_a) != set(ins_b):
        raise InputError(f"{path_b} cannot be compared with {path_a}: inputs "
                         f"{sorted(ins_b)} differ from {sorted(ins_a)}")
    for name, a in ins_a.items():
        b = ins_b[name]
        if a.type != b.type or _shapes_conflict(a.shape, b.shape):
            raise InputError(f"{path_b} cannot be compared with {path_a}: input '{name}' is "
                             f"{b.type} {list(b.shape)}, not {a.type} {list(a.shape)}")
    out_a, out_b = sess_a.get_outputs()[0], sess_b.get_outputs()[0]
    if _shapes_conflict(out_a.shape, out_b.shape):
        raise InputError(f"{path_b} cannot be compared with {path_a}: first output "
                         f"'{out_b.name}' has shape {list(out_b.shape)}, not "
                         f"{list(out_a.shape)}")


def _check_data(path: str, model, sess, x: np.ndarray) -> None:
    validate.check_feed(model, x)
    if len(sess.get_inputs()) != 1:
        names = [i.name for i in sess.get_inputs()]
        raise InputError(f"--data feeds one input, but {path} has {len(names)} inputs "
                         f"({', '.join(names)})")


def _labels(y: np.ndarray, data: str) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise InputError(f"{data}: labels 'y' must be integers (got {y.dtype})")


def _batch_rows(x: np.ndarray, n: int) -> np.ndarray:
    """The first n rows of x, repeated when x has fewer."""
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x] * (-(-n // len(x))))[:n]


def _run_all(sess, x: np.ndarray, batch: int) -> list[np.ndarray]:
    """All outputs for x; a model with a fixed batch size gets exactly that many rows a run
    (the last run padded, the padding dropped from the outputs)."""
    fixed = _fixed_batch(sess)
    if fixed is None:
        return validate.run_batches(sess, x, batch)
    n = len(x)
    padded = np.concatenate([x, _batch_rows(x, fixed - n % fixed)]) if n % fixed else x
    outs = validate.run_batches(sess, padded, fixed)
    return [o[:n] if o.ndim and len(o) == len(padded) else o for o in outs]


def _input_dtype(sess) -> type:
    return validate._NP_TYPES.get(sess.get_inputs()[0].type, np.float32)


def evaluate(model: str | os.PathLike, other: str | os.PathLike | None = None,
             options: EvalOptions | None = None, progress: Progress | None = None) -> dict:
    """Parameters, MACs, accuracy (with labels), agreement (with two models) and latency.

    Returns the report as a JSON-serializable dict."""
    options = options or EvalOptions()
    options.check()
    progress = progress or _no_progress
    paths = [str(model)] + ([str(other)] if other is not None else [])
    x = y = None
    if options.data:
        x, y = validate.load_data(options.data)
        if len(x) == 0:
            raise InputError(f"{options.data}: 'x' is empty")
        if y is not None:
            y = _labels(y, options.data)

    # Load every model (every bad file is an InputError) and check the data before running.
    entries, sessions = [], []
    for path in paths:
        ir_model = load_normalized(path)
        sess = _session(path, options.threads)
        if x is not None:
            _check_data(path, ir_model, sess, x)
        entries.append({"path": path, "params": total_params(ir_model),
                        "macs": total_macs(ir_model)})
        del ir_model
        sessions.append(sess)
    if len(sessions) == 2:
        _check_compatible(paths[0], sessions[0], paths[1], sessions[1])
    fixed = {_fixed_batch(s) for s in sessions} - {None}
    if len(fixed) > 1:
        raise InputError(f"{paths[1]} cannot be compared with {paths[0]}: fixed batch sizes "
                         f"{sorted(fixed)} differ")
    batch = fixed.pop() if fixed else options.batch  # a fixed-batch model dictates the batch

    report: dict = {"models": entries}
    outputs: list[list[np.ndarray]] | None = None
    if x is not None and (y is not None or len(sessions) == 2):
        outputs = [_run_all(s, x, options.eval_batch) for s in sessions]
        inputs, samples = "data", len(x)
    elif len(sessions) == 2:
        feeds = validate.random_inputs(sessions[0], batch=8, seed=options.seed)
        outputs = [s.run(None, feeds) for s in sessions]
        inputs, samples = "random", int(next(iter(feeds.values())).shape[0]) if feeds else 1
    else:  # only latency runs: its feed is all there is
        inputs, samples = ("data" if x is not None else "random"), batch

    if y is not None and outputs is not None and all(  # a [N, classes] first output
            o[0].ndim == 2 and o[0].shape[0] == len(y) and o[0].shape[1] > 1 for o in outputs):
        accuracy = []
        for path, out in zip(paths, outputs, strict=True):
            logits = out[0]
            classes = logits.shape[1]
            if len(y) and (y.min() < 0 or y.max() >= classes):
                raise InputError(f"{options.data}: labels 'y' range over {int(y.min())}.."
                                 f"{int(y.max())}, but {path} has {classes} classes")
            accuracy.append({
                "path": path, "top1": validate.topk_accuracy(logits, y, 1),
                "top5": validate.topk_accuracy(logits, y, 5) if classes >= 5 else None})
        report["accuracy"] = accuracy

    if len(sessions) == 2:
        a, b = outputs[0][0], outputs[1][0]
        if a.shape != b.shape:
            raise InputError(f"{paths[1]} cannot be compared with {paths[0]}: first output "
                             f"has shape {list(b.shape)}, not {list(a.shape)}")
        agree = validate.agreement(outputs[0], outputs[1])
        report["agreement"] = {"inputs": inputs, "samples": samples, "top1": agree.top1,
                               "max_abs": agree.max_abs, "mean_abs": agree.mean_abs}

    if x is not None:
        name = sessions[0].get_inputs()[0].name
        feeds = {name: _batch_rows(x, batch).astype(_input_dtype(sessions[0]))}
    else:
        feeds = validate.random_inputs(sessions[0], batch=batch, seed=options.seed)
    step = progress("measuring latency", options.repeat)
    times = validate.latency(sessions, feeds, options.repeat, options.warmup, on_step=step)
    latency: dict = {"threads": options.threads, "batch": batch, "repeat": options.repeat,
                     "warmup": options.warmup, "models": []}
    for path, t in zip(paths, times, strict=True):
        latency["models"].append({"path": path, "p50_ms": validate.percentile(t, 50) * 1e3,
                                  "p90_ms": validate.percentile(t, 90) * 1e3})
    if len(sessions) == 2:
        p50 = [m["p50_ms"] for m in latency["models"]]
        latency["ratio"] = p50[1] / p50[0] if p50[0] else None
    report["latency"] = latency
    report["inputs"] = inputs
    report["samples"] = samples
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _relative(value: int, base: int) -> str:
    return f"{_count(value)} ({value / base:.0%})" if base else _count(value)


def eval_table(report: dict) -> Table:
    lat = report["latency"]
    table = Table(title=f"Evaluation (onnxruntime CPU, {lat['threads']} thread(s), batch "
                  f"{lat['batch']}, {lat['repeat']} runs each"
                  f"{', alternating' if len(report['models']) > 1 else ''})",
                  title_justify="left")
    for col, justify in (("model", "left"), ("params", "right"), ("MACs", "right"),
                         ("top-1", "right"), ("top-5", "right"), ("p50 ms", "right"),
                         ("p90 ms", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    accuracy = report.get("accuracy") or [{}] * len(report["models"])
    first = report["models"][0]
    for k, (m, acc, t) in enumerate(zip(report["models"], accuracy, lat["models"],
                                                        strict=True)):
        params = _count(m["params"]) if k == 0 else _relative(m["params"], first["params"])
        macs = _count(m["macs"]) if k == 0 else _relative(m["macs"], first["macs"])
        table.add_row(m["path"], params, macs, _pct(acc.get("top1")), _pct(acc.get("top5")),
                      f"{t['p50_ms']:.3f}", f"{t['p90_ms']:.3f}")
    return table


def print_eval(console: Console, report: dict) -> None:
    """The report as a table, one row per model, with agreement and latency ratio below."""
    console.print(eval_table(report))
    if "accuracy" in report:
        console.print(f"accuracy on {report['samples']} labelled samples")
    agree = report.get("agreement")
    if agree:
        console.print(agreement_line(agree, report["samples"], report["inputs"]))
    ratio = report["latency"].get("ratio")
    if ratio is not None:
        console.print(f"latency ratio (p50, second / first): {ratio:.2f}×")


__all__ = ["EvalOptions", "evaluate", "eval_table", "print_eval"]
