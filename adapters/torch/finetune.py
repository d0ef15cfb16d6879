"""Fine-tune an ONNX classifier with PyTorch and write the weights back into the ONNX graph.

`onnxprune finetune pruned.onnx --data train.npz --epochs N -o tuned.onnx`:
the model is interpreted by `OnnxModule` (so it may come from any framework),
trained with cross-entropy on the `.npz` arrays `x` (fed to the model's only input)
and `y` (integer labels), BatchNormalization in training mode (batch statistics,
running statistics updated with the ONNX momentum), and the trained initializers are
written into the input file's own graph (`OnnxModule.write_back`): the graph is not
re-exported. The written model is checked with `onnx.checker` (full check) and its
top-1 accuracy measured with onnxruntime on the same data, before and after.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxprune.errors import (
    InputError,
    UnsupportedModelError,
    UsageError,
    VerificationError,
)
from onnxprune.load import check_output_path
from onnxprune.validate import (
    check_feed,
    check_graph,
    load_data,
    run_batches,
    session,
    topk_accuracy,
)

OPTIMIZERS = ("sgd", "adam")

#: progress(epoch, step, steps, loss): called after every optimizer step (epoch from 1).
Progress = Callable[[int, int, int, float], None]


def _torch():
    try:
        import torch
    except ImportError:
        raise UsageError("fine-tuning needs PyTorch: pip install onnxprune[torch]") from None
    return torch


def _check_options(epochs, lr, batch_size, optimizer, momentum, weight_decay) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError("--lr must be a positive number")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{optimizer}' (choose from {', '.join(OPTIMIZERS)})")
    if not 0 <= momentum < 1:
        raise UsageError("--momentum must be in [0, 1)")
    if not weight_decay >= 0:
        raise UsageError("--weight-decay must be at least 0")


def _check_graph(path: Path, original: Path) -> None:
    """onnx.checker with full_check, held to the plain check where the input itself fails
    it (the pruning pipeline's rule)."""
    check_graph(path, original, what="fine-tuned")


def _logits(outputs: list[np.ndarray] | np.ndarray) -> np.ndarray:
    return outputs[0] if isinstance(outputs, list) else outputs


def finetune(model_path: str | os.PathLike, data_path: str | os.PathLike, out_path: str | os.PathLike, *,
             epochs: int = 1, lr: float = 1e-3, batch_size: int = 64, optimizer: str = "sgd",
             momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0, device: str | None = None,
             progress: Progress | None = None) -> dict:
    """Train `model_path` on `data_path` with cross-entropy; write `out_path`; return the report.

    The report (JSON-serializable) holds the options, per-epoch mean `losses` and
    `train_accuracy` (measured on the fly, in training mode), onnxruntime top-1
    `accuracy_before` (input model) and `accuracy_after` (written model) on the same
    data, `changed_tensors` (trained tensors whose values differ from the input's),
    `frozen` (weights the input holds in a form that cannot be written back, e.g. a
    bias computed by `ConstantOfShape`: they are not trained), and
    `max_abs_diff` between the trained module and onnxruntime on the written model.
    """
    torch = _torch()
    from .onnx_module import OnnxModule

    _check_options(epochs, lr, batch_size, optimizer, momentum, weight_decay)
    model_path, data_path = Path(model_path), Path(data_path)
    out_path = check_output_path(out_path, [model_path, data_path])
    start = time.perf_counter()
    x, y = load_data(data_path)
    if y is None:
        raise InputError(f"{data_path} has no labels 'y': fine-tuning needs integer labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{data_path}: labels 'y' must be integers (found {y.dtype})")
    if len(x) == 0:
        raise InputError(f"{data_path} holds no samples")
    y = y.astype(np.int64)

    module = OnnxModule(model_path)
    graph = module.model.graph
    if len(graph.inputs) != 1:
        raise UnsupportedModelError(f"fine-tuning feeds 'x' to the model's only input; this model has "
                                    f"{len(graph.inputs)} inputs")
    check_feed(module.model, x)

    reference = session(model_path)
    before = _logits(run_batches(reference, x, max(batch_size, 64)))
    if before.ndim != 2 or before.shape[1] < 2:
        raise UnsupportedModelError(f"fine-tuning trains classifiers: the first output must be "
                                    f"[batch, classes], this model gives {list(before.shape)}")
    classes = before.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise InputError(f"{data_path}: labels must be in [0, {classes - 1}] for this model's "
                         f"{classes} classes (found {y.min()}..{y.max()})")
    accuracy_before = topk_accuracy(before, y)
    del reference

    frozen = module.unwritable()
    for name, param in module.named_onnx_parameters():
        if name in frozen:
            param.requires_grad_(False)
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise UnsupportedModelError("the model has no trainable weights that can be written back")
    initial = module.state_dict_onnx()

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(dev)
    torch.manual_seed(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)

    rng = np.random.default_rng(seed)
    steps = math.ceil(len(x) / batch_size)
    losses, train_accuracy = [], []
    module.train()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        total_loss, correct = 0.0, 0
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            xb = torch.from_numpy(np.ascontiguousarray(x[index])).to(dev)
            yb = torch.from_numpy(y[index]).to(dev)
            logits = module(xb)
            logits = logits[0] if isinstance(logits, tuple) else logits
            loss = torch.nn.functional.cross_entropy(logits.float(), yb)
            if not torch.isfinite(loss):
                raise VerificationError(f"the loss became {loss.item()} in epoch {epoch}, step {step + 1} "
                                        "(learning rate too high?); nothing was written")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.item()) * len(index)
            correct += int((logits.argmax(1) == yb).sum().item())
            if progress is not None:
                progress(epoch, step + 1, steps, float(loss.item()))
        losses.append(total_loss / len(x))
        train_accuracy.append(correct / len(x))

    module.eval()
    result = module.write_back(out_path, model_path, check=lambda p: _check_graph(p, model_path))
    final = module.state_dict_onnx()
    changed = [n for n in final if not np.array_equal(final[n], initial[n])]

    written = session(out_path)
    after = _logits(run_batches(written, x, max(batch_size, 64)))
    accuracy_after = topk_accuracy(after, y)
    probe = x[:min(len(x), 64)]
    with torch.no_grad():
        mine = module(torch.from_numpy(np.ascontiguousarray(probe)).to(dev))
    mine = (mine[0] if isinstance(mine, tuple) else mine).float().cpu().numpy()
    max_abs_diff = float(np.abs(mine - after[:len(probe)]).max())

    return {
        "format": "onnxprune-finetune/1",
        "model": str(model_path),
        "data": str(data_path),
        "output": str(out_path),
        "samples": len(x),
        "classes": int(classes),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": float(lr),
        "momentum": float(momentum) if optimizer == "sgd" else None,
        "weight_decay": float(weight_decay),
        "seed": seed,
        "device": str(dev),
        "losses": [float(v) for v in losses],
        "train_accuracy": [float(v) for v in train_accuracy],
        "accuracy_before": float(accuracy_before),
        "accuracy_after": float(accuracy_after),
        "parameters": len(module.onnx_names()),
        "trained_parameters": len(trainable),
        "running_stats": len(module.named_onnx_buffers()),
        "changed_tensors": len(changed),
        "written_tensors": len(result["changed"]),
        "frozen": frozen,
        "skipped": result["skipped"],
        "max_abs_diff": max_abs_diff,
        "seconds": round(time.perf_counter() - start, 3),
    }
