"""Run an ONNX model as a trainable `torch.nn.Module`, and write trained weights back.

`OnnxModule(model)` interprets the (normalized) main graph node by node with torch
operations, so any ONNX model the core handles (a pruned model, an export from
TensorFlow, Keras or PaddlePaddle) can be fine-tuned with ordinary PyTorch code::

    module = OnnxModule("pruned.onnx").train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(module(x), y)
    loss.backward(); opt.step()
    module.write_back("tuned.onnx")      # same graph, trained initializers

What becomes what:

- **Parameters** (`nn.Parameter`, trained): floating-point constants in weight
  positions: Conv/ConvTranspose/Gemm/MatMul/Einsum operands and biases,
  Batch/Instance/Layer/GroupNormalization scale and bias, PRelu slopes, the data of
  a Gather (embeddings), and non-scalar constants of Add and Mul (per-channel biases
  and scales, layer scale).
- **Buffers** (persistent, updated in training): BatchNormalization running mean
  and variance. In training mode BatchNormalization normalizes with the batch's
  statistics and updates the running ones with the ONNX rule
  ``running = running * momentum + batch * (1 - momentum)`` (batch variance: the
  biased one, as ONNX's training mode defines it); in eval mode it uses the running
  statistics.
- **Constants** (non-persistent buffers, moved by `.to(device)`): everything else
  (shapes, axes, indices, scalar constants, Resize scales, ...).

Parameters keep their ONNX names: `named_onnx_parameters()`, `onnx_names()`,
`state_dict_onnx()` and `load_state_dict_onnx()` speak ONNX names; the torch-side
`state_dict()` uses sanitized keys (``.`` is not allowed in parameter names).

`write_back(path)` loads the *original* input file (not the normalized graph), sets
each trained tensor where the input holds it, and saves atomically; the graph is not
re-exported. A tensor is found where the input model holds it: an initializer, a
`Constant` node's value (``value``, ``value_float``, ``value_floats``), or, for a
weight the loader folded from a constant subgraph, the source tensor of a chain of
layout-only ops (``Identity``, ``Cast``, ``CastLike``, ``Reshape``, ``Flatten``,
``Squeeze``, ``Unsqueeze``, ``Transpose``), written through the inverse layout
(and cast back to the source's type). Skipped (reported in ``skipped``; see
`unwritable()`, which `finetune` uses to freeze them before training): weights
computed by any other constant op (e.g. a ``ConstantOfShape`` bias, a ``Mul`` of two
constants), integer source tensors, and sparse/integer ``Constant`` attributes.
When two trained tensors come from one source tensor (a weight used directly and,
folded, through a Transpose), both are written into it in turn: the last one wins.

Op coverage: `supported_ops()` (default domain only). Not supported, with a one-line
`UnsupportedModelError` naming the op or mode at construction (ops) or on the first
run (modes): quantized ops (QuantizeLinear, DequantizeLinear, QLinearConv, ...),
Loop/Scan and other control flow but `If`, custom domains, Resize ``cubic`` or
``tf_crop_and_resize`` or antialiased linear downscaling, MaxPool's Indices output,
dilated AveragePool, reflect/edge/wrap Pad over more than 3 trailing axes.
Behaviour follows onnxruntime where it departs from the specification: pooling with
``auto_pad=SAME_*`` computes its padding with the undilated kernel.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxprune.errors import InputError, UnsupportedModelError, UsageError
from onnxprune.load import (
    check_output_path,
    load_model,
    load_normalized,
    normalize,
    opset,
    origin,
    save_model,
)

__all__ = ["OnnxModule", "supported_ops"]

# ONNX TensorProto element types -> torch dtypes.
_TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
    6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
    12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16,
}

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _torch_dtype(elem_type: int) -> torch.dtype:
    try:
        return _TORCH_DTYPES[int(elem_type)]
    except KeyError:
        raise UnsupportedModelError(f"ONNX element type {ir.DataType(int(elem_type)).name} "
                                    "is not supported by OnnxModule") from None


def _to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype.kind not in "biuf" or array.dtype.itemsize == 0:
        name = str(array.dtype)
        if name == "bfloat16":
            return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        raise UnsupportedModelError(f"tensors of type {name} are not supported by OnnxModule")
    return torch.from_numpy(np.array(array, copy=True))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().copy()


# ---------------------------------------------------------------------------
# compiled graph
# ---------------------------------------------------------------------------


@dataclass
class _Step:
    op: str
    name: str
    inputs: list[str]            # "" for an absent optional input
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    fn: Callable
    static: dict[int, np.ndarray] = field(default_factory=dict)   # constant non-float inputs
    subgraphs: dict[str, _Graph] = field(default_factory=dict)
    free: list[str] = field(default_factory=list)


@dataclass
class _Graph:
    inputs: list[str]
    outputs: list[str]
    steps: list[_Step]


def _attr_value(attr: ir.Attr) -> Any:
    value = attr.value
    if attr.type == ir.AttributeType.TENSOR:
        return value.numpy()
    if attr.type == ir.AttributeType.TENSORS:
        return [t.numpy() for t in value]
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------
# helpers for the ops
# ---------------------------------------------------------------------------


def _ints(step: _Step, xs: list, i: int) -> list[int] | None:
    """Input `i` as a list of python ints (None when absent)."""
    if i >= len(xs) or xs[i] is None:
        return None
    if i in step.static:
        return [int(v) for v in step.static[i].reshape(-1)]
    return [int(v) for v in xs[i].reshape(-1).tolist()]


def _floats(step: _Step, xs: list, i: int) -> list[float] | None:
    if i >= len(xs) or xs[i] is None:
        return None
    if i in step.static:
        return [float(v) for v in step.static[i].reshape(-1)]
    return [float(v) for v in xs[i].reshape(-1).tolist()]


def _scalar(step: _Step, xs: list, i: int, default=None):
    if i >= len(xs) or xs[i] is None:
        return default
    if i in step.static:
        return step.static[i].reshape(-1)[0].item()
    return xs[i].reshape(-1)[0].item()


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX begin/end pads of the trailing axes -> torch F.pad order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=False):
        out += [int(b), int(e)]
    return out


def _spatial_pads(step: _Step, in_sizes: list[int], kernel: list[int], strides: list[int],
                  dilations: list[int]) -> tuple[list[int], list[int]]:
    nd = len(kernel)
    auto_pad = step.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=False):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            if auto_pad == "SAME_UPPER":
                begin.append(small)
                end.append(total - small)
            else:
                begin.append(total - small)
                end.append(small)
        return begin, end
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    pads = step.attrs.get("pads") or [0] * (2 * nd)
    return list(pads[:nd]), list(pads[nd:])


def _conv_fn(nd: int, transpose: bool = False):
    if nd not in (1, 2, 3):
        raise UnsupportedModelError(f"{nd}-D convolutions are not supported by OnnxModule")
    if transpose:
        return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1]


def _crop_or_pad(y: torch.Tensor, begin: list[int], end: list[int]) -> torch.Tensor:
    """Remove `begin`/`end` entries from the trailing axes (negative amounts pad zeros)."""
    if any(begin) or any(end):
        y = F.pad(y, [-v for v in _torch_pads(begin, end)])
    return y


# ---------------------------------------------------------------------------
# ops: each takes (module, step, inputs) and returns a tensor or a list of tensors
# ---------------------------------------------------------------------------


def _op_conv(m, s, xs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nd = w.dim() - 2
    kernel = list(s.attrs.get("kernel_shape") or w.shape[2:])
    strides = list(s.attrs.get("strides") or [1] * nd)
    dil = list(s.attrs.get("dilations") or [1] * nd)
    begin, end = _spatial_pads(s, list(x.shape[2:]), kernel, strides, dil)
    if begin == end:
        padding = begin
    else:
        x = F.pad(x, _torch_pads(begin, end))
        padding = [0] * nd
    return _conv_fn(nd)(x, w, b, strides, padding, dil, s.attrs.get("group", 1))


def _op_conv_transpose(m, s, xs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nd = w.dim() - 2
    group = s.attrs.get("group", 1)
    kernel = list(s.attrs.get("kernel_shape") or w.shape[2:])
    strides = list(s.attrs.get("strides") or [1] * nd)
    dil = list(s.attrs.get("dilations") or [1] * nd)
    out_pad = list(s.attrs.get("output_padding") or [0] * nd)
    in_sizes = list(x.shape[2:])
    full = [(i - 1) * st + (k - 1) * d + 1 for i, st, k, d in zip(in_sizes, strides, kernel, dil, strict=False)]
    auto_pad = s.attrs.get("auto_pad", "NOTSET")
    output_shape = s.attrs.get("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [i * st for i, st in zip(in_sizes, strides, strict=False)]
        output_shape = list(output_shape)[-nd:]
        begin, end = [], []
        for f, op_, o in zip(full, out_pad, output_shape, strict=False):
            total = f + op_ - o
            if auto_pad == "SAME_UPPER":
                begin.append(total // 2)
                end.append(total - total // 2)
            else:
                begin.append(total - total // 2)
                end.append(total // 2)
    else:
        pads = s.attrs.get("pads") or [0] * (2 * nd)
        begin, end = list(pads[:nd]), list(pads[nd:])
    y = _conv_fn(nd, transpose=True)(x, w, None, strides, 0, 0, group, dil)
    end = [e - op_ for e, op_ in zip(end, out_pad, strict=False)]
    y = _crop_or_pad(y, begin, end)
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nd)
    return y


def _op_gemm(m, s, xs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if s.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if s.attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = s.attrs.get("alpha", 1.0), s.attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


def _op_batchnorm(m, s, xs):
    x, scale, bias, mean, var = xs[:5]
    eps = s.attrs.get("epsilon", 1e-5)
    momentum = s.attrs.get("momentum", 0.9)
    c = x.shape[1]
    view = [1, c] + [1] * (x.dim() - 2)
    batch_stats = s.attrs.get("training_mode", 0) == 1 or (m.training and s.inputs[3] in m._stat_keys)
    extra = len(s.outputs) > 1 and any(s.outputs[1:])
    if not batch_stats:
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        return [y, mean, var][:len(s.outputs)] if extra else y
    dims = [0] + list(range(2, x.dim()))
    bmean = x.mean(dims)
    bvar = x.var(dims, unbiased=False)
    y = (x - bmean.reshape(view)) * torch.rsqrt(bvar.reshape(view) + eps)
    y = y * scale.reshape(view) + bias.reshape(view)
    new_mean = mean * momentum + bmean.detach() * (1 - momentum)
    new_var = var * momentum + bvar.detach() * (1 - momentum)
    if m.training and s.inputs[3] in m._stat_keys and s.inputs[4] in m._stat_keys:
        with torch.no_grad():
            mean.copy_(new_mean)
            var.copy_(new_var)
    return [y, new_mean, new_var][:len(s.outputs)] if extra else y


def _op_instancenorm(m, s, xs):
    return F.instance_norm(xs[0], weight=xs[1], bias=xs[2], eps=s.attrs.get("epsilon", 1e-5))


def _op_layernorm(m, s, xs):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    axis = _axis(s.attrs.get("axis", -1), x.dim())
    eps = s.attrs.get("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if len(s.outputs) == 1 and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = list(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    y = (x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv][:len(s.outputs)]


def _op_groupnorm(m, s, xs):
    x, scale, bias = xs[:3]
    groups = s.attrs["num_groups"]
    eps = s.attrs.get("epsilon", 1e-5)
    n, c = x.shape[0], x.shape[1]
    h = x.reshape(n, groups, -1)
    h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    h = h.reshape(x.shape)
    if scale.numel() != c:  # opset 18: one scale per group
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    view = [1, c] + [1] * (x.dim() - 2)
    return h * scale.reshape(view) + bias.reshape(view)


def _op_lrn(m, s, xs):
    return F.local_response_norm(xs[0], s.attrs["size"], s.attrs.get("alpha", 1e-4),
                                 s.attrs.get("beta", 0.75), s.attrs.get("bias", 1.0))


def _op_lpnorm(m, s, xs):
    x = xs[0]
    p = s.attrs.get("p", 2)
    return x / torch.linalg.vector_norm(x, ord=p, dim=s.attrs.get("axis", -1), keepdim=True)


def _pool_geometry(s, x, dilated: bool):
    kernel = list(s.attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(s.attrs.get("strides") or [1] * nd)
    dil = list(s.attrs.get("dilations") or [1] * nd) if dilated else [1] * nd
    in_sizes = list(x.shape[2:])
    # auto_pad SAME: the padding is computed with the undilated kernel, as onnxruntime does
    begin, end = _spatial_pads(s, in_sizes, kernel, strides, [1] * nd)
    ceil_mode = bool(s.attrs.get("ceil_mode", 0))
    out = []
    for size, k, st, d, b, e in zip(in_sizes, kernel, strides, dil, begin, end, strict=False):
        span = size + b + e - ((k - 1) * d + 1)
        if ceil_mode:
            o = -(-span // st) + 1
            if (o - 1) * st >= size + b:  # a window may not start in the end padding
                o -= 1
        else:
            o = span // st + 1
        out.append(o)
    return kernel, strides, dil, begin, end, ceil_mode, out


def _fit(y: torch.Tensor, out: list[int]) -> torch.Tensor:
    for i, o in enumerate(out):
        if y.shape[2 + i] > o:
            y = y.narrow(2 + i, 0, o)
    return y


def _op_maxpool(m, s, xs):
    x = xs[0]
    if len(s.outputs) > 1 and s.outputs[1]:
        raise UnsupportedModelError(f"MaxPool '{s.name}': the Indices output is not supported by OnnxModule")
    kernel, strides, dil, begin, end, ceil_mode, out = _pool_geometry(s, x, dilated=True)
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise UnsupportedModelError(f"MaxPool '{s.name}': {nd}-D pooling is not supported")
    if any(begin) or any(end):
        x = F.pad(x, _torch_pads(begin, end), value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return _fit(fn(x, kernel, strides, 0, dil, ceil_mode), out)


def _sum_pool(x, kernel, strides, ceil_mode):
    nd = len(kernel)
    if nd == 1:
        return F.avg_pool2d(x.unsqueeze(2), [1] + kernel, [1] + strides, 0, ceil_mode, True, 1).squeeze(2)
    if nd == 2:
        return F.avg_pool2d(x, kernel, strides, 0, ceil_mode, True, 1)
    if nd == 3:
        return F.avg_pool3d(x, kernel, strides, 0, ceil_mode, True, 1)
    raise UnsupportedModelError(f"{nd}-D pooling is not supported by OnnxModule")


def _op_avgpool(m, s, xs):
    x = xs[0]
    if any(d != 1 for d in (s.attrs.get("dilations") or [])):
        raise UnsupportedModelError(f"AveragePool '{s.name}' with dilations is not supported by OnnxModule")
    kernel, strides, _, begin, end, ceil_mode, out = _pool_geometry(s, x, dilated=False)
    padded = any(begin) or any(end)
    xp = F.pad(x, _torch_pads(begin, end)) if padded else x
    total = _sum_pool(xp, kernel, strides, ceil_mode)
    ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    if padded:
        ones = F.pad(ones, _torch_pads(begin, end), value=float(s.attrs.get("count_include_pad", 0)))
    count = _sum_pool(ones, kernel, strides, ceil_mode)
    return _fit(total / count, out)


def _op_global_avg(m, s, xs):
    x = xs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _op_global_max(m, s, xs):
    x = xs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _op_flatten(m, s, xs):
    x = xs[0]
    axis = _axis(s.attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _op_reshape(m, s, xs):
    x = xs[0]
    shape = _ints(s, xs, 1) if len(xs) > 1 and xs[1] is not None else list(s.attrs.get("shape", []))
    if not s.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _op_transpose(m, s, xs):
    x = xs[0]
    perm = s.attrs.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(*perm)


def _axes(s, xs, index: int = 1, attr: str = "axes", attr_before: int = 13):
    if s.opset < attr_before:
        axes = s.attrs.get(attr)
        return list(axes) if axes is not None else None
    return _ints(s, xs, index)


def _op_squeeze(m, s, xs):
    x = xs[0]
    axes = _axes(s, xs)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _op_unsqueeze(m, s, xs):
    x = xs[0]
    axes = _axes(s, xs)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _op_concat(m, s, xs):
    parts = [x for x in xs if x is not None]
    return torch.cat(parts, _axis(s.attrs["axis"], parts[0].dim()))


def _op_split(m, s, xs):
    x = xs[0]
    axis = _axis(s.attrs.get("axis", 0), x.dim())
    n = len(s.outputs)
    sizes = list(s.attrs["split"]) if s.opset < 13 and s.attrs.get("split") else _ints(s, xs, 1)
    if not sizes:
        dim = x.shape[axis]
        if "num_outputs" in s.attrs:
            chunk = -(-dim // n)
            sizes = [min(chunk, dim - i * chunk) for i in range(n)]
        else:
            sizes = [dim // n] * n
    return list(torch.split(x, sizes, axis))


def _op_slice(m, s, xs):
    x = xs[0]
    if s.opset < 10:
        starts, ends = list(s.attrs["starts"]), list(s.attrs["ends"])
        axes = list(s.attrs.get("axes") or range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(s, xs, 1), _ints(s, xs, 2)
        axes = _ints(s, xs, 3) or list(range(len(starts)))
        steps = _ints(s, xs, 4) or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    gathers = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        axis = _axis(axis, x.dim())
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            gathers.append((axis, list(range(start, end, step))))
    y = x[tuple(index)]
    for axis, positions in gathers:
        y = y.index_select(axis, torch.tensor(positions, dtype=torch.long, device=x.device))
    return y


def _op_gather(m, s, xs):
    data, idx = xs[0], xs[1]
    axis = _axis(s.attrs.get("axis", 0), data.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def _op_gather_elements(m, s, xs):
    data, idx = xs[0], xs[1]
    axis = _axis(s.attrs.get("axis", 0), data.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def _op_shape(m, s, xs):
    x = xs[0]
    dims = list(x.shape)
    start = s.attrs.get("start", 0)
    end = s.attrs.get("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def _op_size(m, s, xs):
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=xs[0].device)


def _op_constant_of_shape(m, s, xs):
    value = s.attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dtype = _to_torch(value[:1]).dtype
    return torch.full(_ints(s, xs, 0), value[0].item(), dtype=dtype, device=m._device())


def _op_expand(m, s, xs):
    x = xs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(s, xs, 1)))
    return x.expand(shape)


def _op_tile(m, s, xs):
    return xs[0].repeat(_ints(s, xs, 1))


def _op_pad(m, s, xs):
    x = xs[0]
    rank = x.dim()
    mode = s.attrs.get("mode", "constant")
    if s.opset < 11:
        pads = list(s.attrs["pads"])
        value = s.attrs.get("value", 0.0)
        axes = None
    else:
        pads = _ints(s, xs, 1)
        value = _scalar(s, xs, 2, 0)
        axes = _ints(s, xs, 3)
    if axes:
        begin, end = [0] * rank, [0] * rank
        for k, a in enumerate(axes):
            begin[_axis(a, rank)] = pads[k]
            end[_axis(a, rank)] = pads[k + len(axes)]
    else:
        begin, end = pads[:rank], pads[rank:]
    if mode == "constant":
        return F.pad(x, _torch_pads(begin, end), value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise UnsupportedModelError(f"Pad '{s.name}': mode '{mode}' is not supported by OnnxModule")
    if min(begin + end) < 0:
        raise UnsupportedModelError(f"Pad '{s.name}': negative pads in mode '{mode}' are not supported")
    padded = [i for i in range(rank) if begin[i] or end[i]]
    if not padded:
        return x
    first = padded[0]
    k = rank - first
    if k > 3:
        raise UnsupportedModelError(f"Pad '{s.name}': mode '{mode}' on more than 3 trailing axes "
                                    "is not supported by OnnxModule")
    lead = list(x.shape[:first])
    h = x.reshape([1, math.prod(lead)] + list(x.shape[first:]))
    h = F.pad(h, _torch_pads(begin[first:], end[first:]), mode=torch_mode)
    return h.reshape(lead + list(h.shape[2:]))


def _resize_coords(ctm: str, out: int, size: int, scale: float) -> np.ndarray:
    """ONNX coordinate transformation: output index -> input coordinate (float32 math)."""
    x = np.arange(out, dtype=np.float32)
    scale = np.float32(scale)
    if ctm == "half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5)
    if ctm == "pytorch_half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5) if out > 1 else np.zeros(out, np.float32)
    if ctm == "align_corners":
        if out == 1:
            return np.zeros(out, np.float32)
        return x * np.float32(size - 1) / np.float32(out - 1)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_half_pixel_for_nn":
        return (x + np.float32(0.5)) / scale
    if ctm == "half_pixel_symmetric":
        adjustment = np.float32(out) / (scale * np.float32(size))
        center = np.float32(size) / np.float32(2)
        offset = center * (np.float32(1) - adjustment)
        return offset + (x + np.float32(0.5)) / scale - np.float32(0.5)
    raise UnsupportedModelError(f"Resize coordinate_transformation_mode '{ctm}' is not supported "
                                "by OnnxModule")


def _nearest(coords: np.ndarray, mode: str, downsample: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        idx = np.ceil(coords - np.float32(0.5))
    elif mode == "round_prefer_ceil":
        idx = np.floor(coords + np.float32(0.5))
    elif mode == "floor":
        idx = np.floor(coords)
    elif mode == "ceil":
        idx = np.ceil(coords)
    elif mode == "simple":  # Upsample and Resize-10
        idx = np.ceil(coords) if downsample else np.trunc(coords)
    else:
        raise UnsupportedModelError(f"Resize nearest_mode '{mode}' is not supported by OnnxModule")
    return idx.astype(np.int64)


def _op_resize(m, s, xs):
    x = xs[0]
    rank = x.dim()
    attrs = s.attrs
    mode = attrs.get("mode", "nearest")
    sizes = None
    if s.op == "Upsample":
        scales = list(attrs["scales"]) if s.opset < 9 else _floats(s, xs, 1)
        ctm, nearest_mode = "asymmetric", "simple"
    elif s.opset < 11:
        scales = _floats(s, xs, 1)
        ctm, nearest_mode = "asymmetric", "simple"
    else:
        scales = _floats(s, xs, 2)
        sizes = _ints(s, xs, 3)
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    if mode in ("bilinear", "trilinear"):
        mode = "linear"
    if mode not in ("nearest", "linear"):
        raise UnsupportedModelError(f"Resize '{s.name}': mode '{mode}' is not supported by OnnxModule "
                                    "(nearest and linear are)")
    if ctm == "tf_crop_and_resize":
        raise UnsupportedModelError(f"Resize '{s.name}': coordinate_transformation_mode "
                                    "'tf_crop_and_resize' is not supported by OnnxModule")
    axes = [_axis(a, rank) for a in (attrs.get("axes") or range(rank))]
    in_sizes = [x.shape[a] for a in axes]
    if sizes:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            outs = list(sizes)
            factors = [o / i for o, i in zip(outs, in_sizes, strict=False)]
        else:
            pick = min if policy == "not_larger" else max
            f = pick(o / i for o, i in zip(sizes, in_sizes, strict=False))
            factors = [f] * len(axes)
            outs = [math.floor(f * i + 0.5) for i in in_sizes]
    elif scales:
        factors = list(scales)
        outs = [math.floor(i * f) for i, f in zip(in_sizes, factors, strict=False)]
    else:
        raise UnsupportedModelError(f"Resize '{s.name}' has neither scales nor sizes")
    if attrs.get("antialias", 0) and mode == "linear" and any(f < 1 for f in factors):
        raise UnsupportedModelError(f"Resize '{s.name}': antialiased downscaling is not supported "
                                    "by OnnxModule")
    y = x
    for axis, size, out, factor in zip(axes, in_sizes, outs, factors, strict=False):
        if out == size and factor == 1:
            continue
        coords = _resize_coords(ctm, out, size, factor)
        if mode == "nearest":
            idx = np.clip(_nearest(coords, nearest_mode, factor < 1), 0, size - 1)
            y = y.index_select(axis, torch.from_numpy(idx).to(y.device))
            continue
        coords = np.clip(coords, 0, size - 1)
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        w = (coords - lo).astype(np.float32)
        view = [1] * rank
        view[axis] = out
        wt = torch.from_numpy(w).to(device=y.device, dtype=y.dtype).reshape(view)
        a = y.index_select(axis, torch.from_numpy(lo).to(y.device))
        b = y.index_select(axis, torch.from_numpy(hi).to(y.device))
        y = a + (b - a) * wt
    return y


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": None,
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: x.square().sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: x.square().sum(d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: x.sum(d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _op_reduce(m, s, xs):
    x = xs[0]
    attr_before = 13 if s.op == "ReduceSum" else 18
    axes = _axes(s, xs, attr_before=attr_before)
    keep = bool(s.attrs.get("keepdims", 1))
    if not axes:
        if s.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = tuple(sorted(_axis(a, x.dim()) for a in axes))
    if x.dim() == 0:
        return x
    if s.op == "ReduceProd":
        for d in reversed(dims):
            x = x.prod(d, keepdim=keep)
        return x
    return _REDUCE[s.op](x, dims, keep)


def _op_argext(m, s, xs):
    x = xs[0]
    axis = _axis(s.attrs.get("axis", 0), x.dim())
    keep = bool(s.attrs.get("keepdims", 1))
    fn = torch.argmax if s.op == "ArgMax" else torch.argmin
    if s.attrs.get("select_last_index", 0):
        flipped = fn(x.flip(axis), axis, keepdim=keep)
        return x.shape[axis] - 1 - flipped
    return fn(x, axis, keepdim=keep)


def _op_softmax(m, s, xs):
    x = xs[0]
    fn = {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax}[s.op]
    if s.opset < 13:
        axis = _axis(s.attrs.get("axis", 1), x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, 1).reshape(x.shape)
    return fn(x, s.attrs.get("axis", -1))


def _op_hardmax(m, s, xs):
    x = xs[0]
    axis = s.attrs.get("axis", -1 if s.opset >= 13 else 1)
    if s.opset < 13:
        axis = _axis(axis, x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return F.one_hot(flat.argmax(1), flat.shape[1]).to(x.dtype).reshape(x.shape)
    axis = _axis(axis, x.dim())
    return F.one_hot(x.argmax(axis), x.shape[axis]).to(x.dtype).movedim(-1, axis)


def _op_cast(m, s, xs):
    return xs[0].to(_torch_dtype(s.attrs["to"]))


def _op_dropout(m, s, xs):
    x = xs[0]
    if s.opset < 12:
        ratio = s.attrs.get("ratio", 0.5)
        train = m.training
    else:
        ratio = _scalar(s, xs, 1, 0.5)
        train = m.training or bool(_scalar(s, xs, 2, False))
    if train and ratio > 0:
        if len(s.outputs) > 1 and s.outputs[1]:
            mask = torch.rand_like(x, dtype=torch.float32) >= ratio
            return [x * mask / (1 - ratio), mask]
        return F.dropout(x, ratio, True)
    if len(s.outputs) > 1 and s.outputs[1]:
        return [x, torch.ones_like(x, dtype=torch.bool)]
    return x


def _op_clip(m, s, xs):
    x = xs[0]
    if s.opset < 11:
        lo, hi = s.attrs.get("min"), s.attrs.get("max")
    else:
        lo = xs[1] if len(xs) > 1 else None
        hi = xs[2] if len(xs) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def _op_prelu(m, s, xs):
    x, slope = xs
    return torch.where(x < 0, x * slope, x)


def _binary(fn):
    return lambda m, s, xs: fn(xs[0], xs[1])


def _op_div(m, s, xs):
    a, b = xs
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _op_pow(m, s, xs):
    y = torch.pow(xs[0], xs[1])
    return y.to(xs[0].dtype) if y.dtype != xs[0].dtype else y


def _op_mod(m, s, xs):
    return (torch.fmod if s.attrs.get("fmod", 0) else torch.remainder)(xs[0], xs[1])


def _variadic(fn):
    def run(m, s, xs):
        parts = [x for x in xs if x is not None]
        out = parts[0]
        for p in parts[1:]:
            out = fn(out, p)
        return out
    return run


def _op_mean(m, s, xs):
    parts = [x for x in xs if x is not None]
    return _variadic(torch.add)(m, s, parts) / len(parts)


def _op_where(m, s, xs):
    return torch.where(xs[0].bool(), xs[1], xs[2])


def _op_range(m, s, xs):
    start, limit, delta = (_scalar(s, xs, i) for i in range(3))
    return torch.arange(start, limit, delta, dtype=xs[0].dtype, device=xs[0].device)


def _op_einsum(m, s, xs):
    return torch.einsum(s.attrs["equation"], *xs)


def _op_cumsum(m, s, xs):
    x = xs[0]
    axis = _axis(int(_scalar(s, xs, 1)), x.dim())
    if s.attrs.get("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if s.attrs.get("exclusive", 0):
        y = y - x
    if s.attrs.get("reverse", 0):
        y = y.flip(axis)
    return y


def _op_depth_to_space(m, s, xs):
    x = xs[0]
    b = s.attrs["blocksize"]
    n, c, h, w = x.shape
    if s.attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _op_space_to_depth(m, s, xs):
    x = xs[0]
    b = s.attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def _op_constant(m, s, xs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in s.attrs:
            array = np.asarray(s.attrs[key])
            if key.startswith("value_float"):
                array = array.astype(np.float32)
            elif key.startswith("value_int"):
                array = array.astype(np.int64)
            return _to_torch(array).to(m._device())
    raise UnsupportedModelError(f"Constant '{s.name}': only tensor, float and int values are supported")


def _op_if(m, s, xs):
    branch = s.subgraphs["then_branch" if bool(xs[0].reshape(-1)[0].item()) else "else_branch"]
    return m._run(branch, dict(m._env_stack[-1]))


def _unary(fn):
    return lambda m, s, xs: fn(xs[0])


def _op_selu(m, s, xs):
    x = xs[0]
    alpha = s.attrs.get("alpha", 1.67326319217681884765625)
    gamma = s.attrs.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _op_gelu(m, s, xs):
    return F.gelu(xs[0], approximate=s.attrs.get("approximate", "none"))


_OPS: dict[str, Callable] = {
    "Conv": _op_conv, "ConvTranspose": _op_conv_transpose, "Gemm": _op_gemm,
    "MatMul": _binary(torch.matmul), "Einsum": _op_einsum,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _op_div, "Pow": _op_pow, "Mod": _op_mod,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": _op_mean, "Where": _op_where,
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor), "Not": _unary(torch.logical_not),
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda m, s, xs: F.leaky_relu(xs[0], s.attrs.get("alpha", 0.01)),
    "PRelu": _op_prelu, "Clip": _op_clip, "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": lambda m, s, xs: torch.clamp(xs[0] * s.attrs.get("alpha", 0.2) + s.attrs.get("beta", 0.5),
                                                0, 1),
    "HardSwish": _unary(F.hardswish), "Tanh": _unary(torch.tanh), "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign), "Mish": _unary(F.mish),
    "Elu": lambda m, s, xs: F.elu(xs[0], s.attrs.get("alpha", 1.0)),
    "Celu": lambda m, s, xs: F.celu(xs[0], s.attrs.get("alpha", 1.0)),
    "ThresholdedRelu": lambda m, s, xs: torch.where(xs[0] > s.attrs.get("alpha", 1.0), xs[0], 0.0),
    "Selu": _op_selu, "Gelu": _op_gelu,
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "IsNaN": _unary(torch.isnan),
    "Identity": _unary(lambda x: x), "Dropout": _op_dropout, "Cast": _op_cast,
    "CastLike": lambda m, s, xs: xs[0].to(xs[1].dtype),
    "BatchNormalization": _op_batchnorm, "InstanceNormalization": _op_instancenorm,
    "LayerNormalization": _op_layernorm, "GroupNormalization": _op_groupnorm, "LRN": _op_lrn,
    "LpNormalization": _op_lpnorm,
    "MaxPool": _op_maxpool, "AveragePool": _op_avgpool,
    "GlobalAveragePool": _op_global_avg, "GlobalMaxPool": _op_global_max,
    "Flatten": _op_flatten, "Reshape": _op_reshape, "Transpose": _op_transpose,
    "Squeeze": _op_squeeze, "Unsqueeze": _op_unsqueeze, "Concat": _op_concat, "Split": _op_split,
    "Slice": _op_slice, "Gather": _op_gather, "GatherElements": _op_gather_elements,
    "Shape": _op_shape, "Size": _op_size, "ConstantOfShape": _op_constant_of_shape,
    "Expand": _op_expand, "Tile": _op_tile, "Pad": _op_pad,
    "Resize": _op_resize, "Upsample": _op_resize,
    **{op: _op_reduce for op in _REDUCE},
    "ArgMax": _op_argext, "ArgMin": _op_argext,
    "Softmax": _op_softmax, "LogSoftmax": _op_softmax, "Hardmax": _op_hardmax,
    "Range": _op_range, "CumSum": _op_cumsum,
    "DepthToSpace": _op_depth_to_space, "SpaceToDepth": _op_space_to_depth,
    "Constant": _op_constant, "If": _op_if,
}


def supported_ops() -> list[str]:
    """The ONNX op types (default domain) that OnnxModule interprets."""
    return sorted(_OPS)


# Which inputs of which ops are trained weights (floating-point constants only).
_WEIGHT_SLOTS: dict[str, tuple[int, ...] | None] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Einsum": None,
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,), "Gather": (0,),
}
_PER_CHANNEL = ("Add", "Mul")      # non-scalar constants of these are trained
_STAT_SLOTS = {"BatchNormalization": (3, 4)}


def _role(node: ir.Node, index: int, value: ir.Value) -> str:
    dtype = value.const_value.dtype
    if not dtype.is_floating_point():
        return "const"
    op = node.op_type
    if op in _WEIGHT_SLOTS and (_WEIGHT_SLOTS[op] is None or index in _WEIGHT_SLOTS[op]):
        return "param"
    if op in _PER_CHANNEL and value.const_value.size > 1:
        return "param"
    if index in _STAT_SLOTS.get(op, ()):
        return "stat"
    return "const"


_RANK = {"const": 0, "stat": 1, "param": 2}


class _Holder(nn.Module):
    """A plain container for buffers with sanitized names."""


_RESERVED = set(dir(nn.ParameterDict())) | set(dir(_Holder()))


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "t"
    if key[0].isdigit():
        key = "t_" + key
    base, n = key, 1
    while key in taken or key in _RESERVED:
        key = f"{base}_{n}"
        n += 1
    taken.add(key)
    return key


# ---------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------


class OnnxModule(nn.Module):
    """An ONNX model as a trainable torch module (see the module docstring).

    `model`: a path (loaded with `onnxprune.load.load_normalized`: Constant nodes
    lifted, constant subgraphs folded, shapes inferred), an already normalized
    `onnx_ir.Model` (e.g. from `load_normalized`, which records the source file for
    `write_back`), or an `onnx.ModelProto` (normalized here; `write_back` then needs
    `source=`). `forward(*inputs)` takes the graph's inputs in order (tensors or
    NumPy arrays; cast to the declared element type and moved to the module's
    device) and returns one tensor, or a tuple when the graph has several outputs.
    """

    def __init__(self, model: str | os.PathLike | ir.Model):
        super().__init__()
        if isinstance(model, ir.Model):
            self.model = model
        elif type(model).__name__ == "ModelProto":  # onnx.ModelProto: normalized here, no source file
            self.model = normalize(ir.serde.deserialize_model(model))
        elif isinstance(model, (str, os.PathLike)):
            self.model = load_normalized(model)
        else:
            raise UsageError(f"OnnxModule needs a path or an onnx_ir.Model, not {type(model).__name__}")
        path = self.model.meta.get("onnxprune.path")
        self.source: Path | None = Path(path) if path else None
        self._opset = opset(self.model)
        self.params = nn.ParameterDict()
        self.stats = _Holder()
        self.consts = _Holder()
        self._param_keys: dict[str, str] = {}
        self._stat_keys: dict[str, str] = {}
        self._const_keys: dict[str, str] = {}
        self._origin: dict[str, str] = {}
        self._env_stack: list[dict] = []
        self._register_constants()
        graph = self.model.graph
        self._input_names = [v.name for v in graph.inputs]
        self._input_dtypes = [self._declared_dtype(v) for v in graph.inputs]
        self._graph = self._compile(graph, outer=set(), main=True)

    # -- construction ---------------------------------------------------------
    @staticmethod
    def _declared_dtype(value: ir.Value) -> torch.dtype | None:
        try:
            return _TORCH_DTYPES.get(int(value.dtype)) if value.dtype is not None else None
        except (TypeError, ValueError):
            return None

    def _all_nodes(self) -> Iterable[ir.Node]:
        for graph in self.model.graphs():
            yield from graph

    def _register_constants(self) -> None:
        roles: dict[str, str] = {}
        values: dict[str, ir.Value] = {}
        for graph in self.model.graphs():
            for value in graph.initializers.values():
                if value.const_value is not None and not value.is_graph_input():
                    values[value.name] = value
                    roles.setdefault(value.name, "const")
        for node in self._all_nodes():
            for index, value in enumerate(node.inputs):
                if value is None or value.name not in values:
                    continue
                role = _role(node, index, value)
                if _RANK[role] > _RANK[roles[value.name]]:
                    roles[value.name] = role
        taken: set[str] = set()
        for name, value in values.items():
            tensor = _to_torch(value.const_value.numpy())
            key = _sanitize(name, taken)
            self._origin[name] = origin(value)
            if roles[name] == "param":
                self.params[key] = nn.Parameter(tensor)
                self._param_keys[name] = key
            elif roles[name] == "stat":
                self.stats.register_buffer(key, tensor)
                self._stat_keys[name] = key
            else:
                self.consts.register_buffer(key, tensor, persistent=False)
                self._const_keys[name] = key
        self._static_values = {name: values[name].const_value.numpy() for name in self._const_keys
                               if not values[name].const_value.dtype.is_floating_point()
                               or values[name].const_value.size <= 64}

    def _compile(self, graph: ir.Graph, outer: set[str], main: bool = False) -> _Graph:
        known = set(outer) | {v.name for v in graph.inputs} | set(self._param_keys) \
            | set(self._stat_keys) | set(self._const_keys)
        nodes = self._topological(list(graph), known)
        unsupported = sorted({n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}::{n.op_type}"
                              for n in nodes
                              if n.domain not in _DEFAULT_DOMAINS or n.op_type not in _OPS})
        if unsupported:
            raise UnsupportedModelError(f"OnnxModule does not support the op{'s' if len(unsupported) > 1 else ''} "
                                        f"{', '.join(unsupported)}")
        steps = []
        for node in nodes:
            attrs, subgraphs = {}, {}
            for key, attr in node.attributes.items():
                if attr.type == ir.AttributeType.GRAPH:
                    subgraphs[key] = self._compile(attr.value, known)
                elif attr.type == ir.AttributeType.GRAPHS:
                    raise UnsupportedModelError(f"{node.op_type} '{node.name}': graph-list attributes "
                                                "are not supported by OnnxModule")
                else:
                    attrs[key] = _attr_value(attr)
            inputs = [v.name if v is not None else "" for v in node.inputs]
            while inputs and inputs[-1] == "":
                inputs.pop()
            static = {i: self._static_values[n] for i, n in enumerate(inputs) if n in self._static_values}
            steps.append(_Step(node.op_type, node.name or node.op_type, inputs,
                               [v.name for v in node.outputs], attrs, self._opset, _OPS[node.op_type],
                               static, subgraphs))
            known.update(v.name for v in node.outputs)
        outputs = [v.name for v in graph.outputs]
        if main:  # forget intermediate values after their last use
            keep = set(outputs)
            last: dict[str, int] = {}
            for index, step in enumerate(steps):
                for name in self._reads(step):
                    last[name] = index
            for name, index in last.items():
                if name not in keep and name not in self._param_keys and name not in self._stat_keys \
                        and name not in self._const_keys:
                    steps[index].free.append(name)
        return _Graph([v.name for v in graph.inputs], outputs, steps)

    @staticmethod
    def _reads(step: _Step) -> set[str]:
        names = {n for n in step.inputs if n}
        for sub in step.subgraphs.values():
            for inner in sub.steps:
                names |= OnnxModule._reads(inner)
            names |= set(sub.outputs)
        return names

    @staticmethod
    def _topological(nodes: list[ir.Node], known: set[str]) -> list[ir.Node]:
        def needs(node: ir.Node) -> set[str]:
            names = {v.name for v in node.inputs if v is not None}
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    for inner in attr.value.all_nodes() if hasattr(attr.value, "all_nodes") else attr.value:
                        names |= {v.name for v in inner.inputs if v is not None}
            return names

        available = set(known)
        order: list[ir.Node] = []
        pending = list(nodes)
        produced = {v.name for n in nodes for v in n.outputs}
        while pending:
            rest = []
            for node in pending:
                if all(n in available or n not in produced for n in needs(node)):
                    order.append(node)
                    available.update(v.name for v in node.outputs)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                raise InputError(f"the graph has a cycle through node '{rest[0].name}'")
            pending = rest
        return order

    # -- running --------------------------------------------------------------
    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _environment(self) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for name, key in self._param_keys.items():
            env[name] = self.params[key]
        for name, key in self._stat_keys.items():
            env[name] = self.stats._buffers[key]
        for name, key in self._const_keys.items():
            env[name] = self.consts._buffers[key]
        return env

    def _run(self, graph: _Graph, env: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        self._env_stack.append(env)
        try:
            for step in graph.steps:
                try:
                    xs = [env[n] if n else None for n in step.inputs]
                except KeyError as exc:
                    raise InputError(f"node '{step.name}' reads '{exc.args[0]}', which nothing computes") from None
                result = step.fn(self, step, xs)
                if isinstance(result, torch.Tensor):
                    env[step.outputs[0]] = result
                else:
                    for name, value in zip(step.outputs, result, strict=False):
                        if name:
                            env[name] = value
                for name in step.free:
                    env.pop(name, None)
            return [env[n] for n in graph.outputs]
        finally:
            self._env_stack.pop()

    def forward(self, *inputs):
        if len(inputs) != len(self._input_names):
            raise UsageError(f"the model takes {len(self._input_names)} input(s) "
                             f"({', '.join(self._input_names)}), got {len(inputs)}")
        device = self._device()
        env = self._environment()
        for name, dtype, x in zip(self._input_names, self._input_dtypes, inputs, strict=False):
            if not isinstance(x, torch.Tensor):
                x = torch.from_numpy(np.asarray(x))
            x = x.to(device)
            if dtype is not None and x.dtype != dtype:
                x = x.to(dtype)
            env[name] = x
        outputs = self._run(self._graph, env)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    # -- ONNX names -------------------------------------------------------------
    def onnx_names(self) -> list[str]:
        """ONNX names of the trainable parameters."""
        return list(self._param_keys)

    def named_onnx_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, self.params[key]) for name, key in self._param_keys.items()]

    def named_onnx_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """BatchNormalization running statistics, by ONNX name."""
        return [(name, self.stats._buffers[key]) for name, key in self._stat_keys.items()]

    def onnx_parameter(self, name: str) -> nn.Parameter:
        return self.params[self._param_keys[name]]

    def origin_of(self, name: str) -> str:
        """The name the tensor has in the input file (differs for folded constants)."""
        return self._origin.get(name, name)

    def state_dict_onnx(self) -> dict[str, np.ndarray]:
        """Every trained tensor (parameters and running statistics) as NumPy, by ONNX name."""
        out = {name: _to_numpy(p) for name, p in self.named_onnx_parameters()}
        out.update((name, _to_numpy(b)) for name, b in self.named_onnx_buffers())
        return out

    @torch.no_grad()
    def load_state_dict_onnx(self, arrays: dict[str, np.ndarray]) -> None:
        """Set trained tensors by ONNX name (shapes must match)."""
        tensors = dict(self.named_onnx_parameters())
        tensors.update(self.named_onnx_buffers())
        for name, array in arrays.items():
            if name not in tensors:
                raise InputError(f"the model has no trained tensor named '{name}'")
            target = tensors[name]
            value = torch.as_tensor(np.asarray(array)).to(device=target.device, dtype=target.dtype)
            if value.shape != target.shape:
                raise InputError(f"tensor '{name}' has shape {list(target.shape)}, got {list(value.shape)}")
            target.copy_(value)

    def extra_repr(self) -> str:
        return (f"nodes={len(self._graph.steps)}, parameters={len(self._param_keys)} "
                f"({sum(p.numel() for p in self.params.values())} values), "
                f"running_stats={len(self._stat_keys)}, constants={len(self._const_keys)}")

    # -- writing back -----------------------------------------------------------
    def _source_or(self, source) -> Path:
        source = Path(source) if source is not None else self.source
        if source is None:
            raise UsageError("write_back needs the source ONNX file: this module was built from an "
                             "in-memory model (pass source=...)")
        return source

    def unwritable(self, source: str | os.PathLike | None = None) -> dict[str, str]:
        """Trained tensors that `write_back` cannot place in the source file, with the reason."""
        index = _WriteIndex(load_model(self._source_or(source)))
        names = list(self._param_keys) + list(self._stat_keys)
        out = {}
        for name in names:
            try:
                index.trace(self.origin_of(name))
            except _Skip as exc:
                out[name] = str(exc)
        return out

    def write_back(self, path_out: str | os.PathLike, source: str | os.PathLike | None = None, *,
                   check: Callable[[Path], None] | None = None) -> dict:
        """Write the current parameters and running statistics into the source model's
        initializers (same names, dtypes and shapes; graph unchanged) and save atomically.

        Returns ``{"output", "written", "changed", "skipped"}``: the names written, those
        whose values differ from the source file's, and ``{name: reason}`` for tensors
        that could not be placed (see the module docstring)."""
        source = self._source_or(source)
        path_out = check_output_path(path_out, [source])
        model = load_model(source)
        model.meta["onnxprune.external"] = any(isinstance(v.const_value, ir.ExternalTensor)
                                               for g in model.graphs() for v in g.initializers.values())
        index = _WriteIndex(model)
        written, skipped = [], {}
        for name, array in self.state_dict_onnx().items():
            try:
                index.write(self.origin_of(name), array)
                written.append(name)
            except _Skip as exc:
                skipped[name] = str(exc)
        changed = index.commit()
        save_model(model, path_out, check=check)
        return {"output": str(path_out), "written": written, "changed": changed, "skipped": skipped}


# ---------------------------------------------------------------------------
# locating tensors in the original model
# ---------------------------------------------------------------------------


class _Skip(Exception):
    pass


_LAYOUT = {"Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
_CONSTANT_ATTRS = ("value", "value_float", "value_floats")


class _WriteIndex:
    """Finds where the original model holds a tensor, and writes it there."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.initializers: dict[str, ir.Value] = {}
        self.producers: dict[str, ir.Node] = {}
        for graph in model.graphs():
            self.initializers.update(graph.initializers)
            for node in graph:
                for out in node.outputs:
                    self.producers[out.name] = node
        self.work: dict[str, np.ndarray] = {}
        self.before: dict[str, np.ndarray] = {}

    def _source_array(self, name: str) -> np.ndarray:
        if name in self.work:
            return self.work[name]
        if name in self.initializers and self.initializers[name].const_value is not None:
            array = self.initializers[name].const_value.numpy()
        else:
            node = self.producers[name]
            attr = next(node.attributes[k] for k in _CONSTANT_ATTRS if k in node.attributes)
            if attr.type == ir.AttributeType.TENSOR:
                array = attr.value.numpy()
            else:
                array = np.asarray(attr.value, dtype=np.float32)
        self.before[name] = np.array(array, copy=True)
        self.work[name] = np.array(array, copy=True)
        return self.work[name]

    def _const(self, name: str) -> np.ndarray:
        """A small constant input (a shape, axes) of a layout op, in the original model."""
        if name in self.initializers and self.initializers[name].const_value is not None:
            return self.initializers[name].const_value.numpy()
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].value.numpy()
        raise _Skip(f"'{name}' is not a constant")

    def trace(self, name: str, depth: int = 0) -> tuple[str, np.ndarray]:
        """(source tensor, index array): entry k of `name` is entry index[k] of the source."""
        if depth > 16:
            raise _Skip("constant chain too long")
        if name in self.initializers and self.initializers[name].const_value is not None:
            shape = tuple(self.initializers[name].const_value.shape.numpy())
            dtype = self.initializers[name].const_value.dtype
            if not dtype.is_floating_point():
                raise _Skip(f"source tensor '{name}' is of integer type {dtype.name}")
            return name, np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
        node = self.producers.get(name)
        if node is None:
            raise _Skip(f"no tensor named '{name}' in the source model")
        op = node.op_type
        if op == "Constant":
            key = next((k for k in _CONSTANT_ATTRS if k in node.attributes), None)
            if key is None:
                raise _Skip(f"Constant '{node.name}' holds a non-float value")
            if key == "value":
                tensor = node.attributes[key].value
                if not tensor.dtype.is_floating_point():
                    raise _Skip(f"Constant '{node.name}' is of integer type {tensor.dtype.name}")
                shape = tuple(tensor.shape.numpy())
            else:
                shape = () if key == "value_float" else (len(node.attributes[key].value),)
            return name, np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
        if op not in _LAYOUT or node.domain not in _DEFAULT_DOMAINS or not node.inputs \
                or node.inputs[0] is None:
            raise _Skip(f"computed by a constant {op} node ('{node.name}') in the source model")
        source, idx = self.trace(node.inputs[0].name, depth + 1)
        attrs = {k: _attr_value(a) for k, a in node.attributes.items()}
        node_opset = opset(self.model)
        if op == "Reshape":
            shape = [int(v) for v in self._const(node.inputs[1].name).reshape(-1)]
            if not attrs.get("allowzero", 0):
                shape = [idx.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            idx = idx.reshape(shape)
        elif op == "Flatten":
            axis = _axis(attrs.get("axis", 1), idx.ndim)
            idx = idx.reshape(math.prod(idx.shape[:axis]), -1)
        elif op == "Transpose":
            idx = idx.transpose(attrs.get("perm") or None)
        elif op in ("Squeeze", "Unsqueeze"):
            if node_opset < 13:
                axes = attrs.get("axes")
            else:
                axes = ([int(v) for v in self._const(node.inputs[1].name).reshape(-1)]
                        if len(node.inputs) > 1 and node.inputs[1] is not None else None)
            if op == "Squeeze":
                idx = np.squeeze(idx, axis=tuple(axes) if axes else None)
            else:
                idx = np.expand_dims(idx, tuple(axes))
        return source, idx

    def write(self, name: str, array: np.ndarray) -> None:
        source, idx = self.trace(name)
        if idx.shape != array.shape:
            raise _Skip(f"shape {list(array.shape)} does not match '{name}' in the source model "
                        f"{list(idx.shape)}")
        target = self._source_array(source)
        target.reshape(-1)[idx.reshape(-1)] = array.reshape(-1).astype(target.dtype)

    def commit(self) -> list[str]:
        changed = []
        for name, array in self.work.items():
            if np.array_equal(array, self.before[name]):
                continue
            changed.append(name)
            if name in self.initializers:
                self.initializers[name].const_value = ir.tensor(array, name=name)
                continue
            node = self.producers[name]
            key = next(k for k in _CONSTANT_ATTRS if k in node.attributes)
            if key == "value":
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=name))
            elif key == "value_float":
                node.attributes[key] = ir.AttrFloat32(key, float(array.reshape(-1)[0]))
            else:
                node.attributes[key] = ir.AttrFloat32s(key, [float(v) for v in array.reshape(-1)])
        return changed
