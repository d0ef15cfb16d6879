"""Criteria that need more than the weights: stored gradients (Taylor), the BatchNorm
that follows a layer (network slimming, Taylor-FO-BN), and the layers that read a
channel (HGSR's feature-wise groups).

Gradients file (`--grads grads.npz`): one array per weight, keyed by the tensor's name
in the model (as `onnxprune analyze` and the plan file name it). Each array holds
dL/dW either with the weight's own shape (the gradient averaged over the batches
used) or with one extra leading axis (one gradient per minibatch). For `taylor-bn`,
the scale (γ) and bias (β) of the BatchNormalization after a layer are keyed the
same way. Any framework can write it: `numpy.savez(path, **{name: grad})`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .analyze.graph import Analysis, Group
from .analyze.sites import Producer
from .errors import InputError
from .load import origin


def as_filters(array: np.ndarray, axis: int) -> np.ndarray:
    """Rows = output channels along `axis`, flattened (a leading batch axis is kept)."""
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1)


class Gradients:
    """A lazily read gradients file, checked tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no such gradients file: {self.path}")
        try:
            self._data = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            raise InputError(f"{self.path} is not a readable .npz gradients file") from None
        if not hasattr(self._data, "files"):
            raise InputError(f"{self.path} is not an .npz file of named arrays")

    def __contains__(self, name: str) -> bool:
        return name in self._data.files

    def batches(self, name: str, shape: tuple[int, ...], layer: str) -> np.ndarray:
        """The gradient of `name`, as float64 with a leading minibatch axis."""
        if name not in self._data.files:
            raise InputError(f"gradients file {self.path.name} has no tensor '{name}' "
                             f"(needed for layer '{layer}')")
        try:
            grad = self._data[name]
        except (ValueError, zipfile.BadZipFile, OSError):
            raise InputError(f"gradient '{name}' in {self.path.name} cannot be read") from None
        if tuple(grad.shape) == tuple(shape):
            grad = grad[None]
        elif tuple(grad.shape[1:]) != tuple(shape) or grad.ndim != len(shape) + 1:
            raise InputError(f"gradient '{name}' has shape {list(grad.shape)}, but the tensor "
                             f"has shape {list(shape)} (or [batches, ...])")
        return grad.astype(np.float64)


def taylor(weight: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Molchanov et al. 2019, the group criterion: (Σ_s w_s·g_s)², per minibatch, then
    averaged over minibatches. `weight` is [C, S]; `grads` is [B, C, S]."""
    return np.mean(np.einsum("cs,bcs->bc", weight, grads) ** 2, axis=0)


def taylor_sq(weight: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Square then sum: Σ_s (w_s·g_s)², averaged over minibatches."""
    return np.mean(np.einsum("bcs->bc", (weight[None] * grads) ** 2), axis=0)


def taylor_bn(gamma: np.ndarray, beta: np.ndarray, d_gamma: np.ndarray,
              d_beta: np.ndarray) -> np.ndarray:
    """Taylor-FO-BN: (γ_c·∂L/∂γ_c + β_c·∂L/∂β_c)², per minibatch, averaged. Gradients are
    [B, C]; this equals the first-order Taylor criterion of a gate after the BN."""
    return np.mean((gamma[None] * d_gamma + beta[None] * d_beta) ** 2, axis=0)


def following_batchnorm(producer: Producer) -> ir.Node | None:
    """The unfused BatchNormalization that reads this layer's output directly, if any."""
    for use in producer.node.outputs[0].uses():
        if use.node.op_type == "BatchNormalization" and use.idx == 0:
            return use.node
    return None


def _const(node: ir.Node, index: int) -> ir.Value | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    return value if value is not None and value.const_value is not None else None


def producer_weight(producer: Producer) -> tuple[ir.Value, np.ndarray]:
    value = producer.node.inputs[producer.weight]
    return value, value.const_value.numpy()


def taylor_scores(producer: Producer, grads: Gradients, squared: bool = False) -> np.ndarray:
    value, weight = producer_weight(producer)
    g = grads.batches(origin(value), weight.shape, producer.node.name)
    w = as_filters(weight.astype(np.float64), producer.axis)
    gb = np.stack([as_filters(b, producer.axis) for b in g])
    return (taylor_sq if squared else taylor)(w, gb)


def taylor_bn_scores(producer: Producer, grads: Gradients) -> np.ndarray:
    """Taylor-FO-BN where a BN with γ and β gradients follows; the weight criterion
    (`taylor`) otherwise."""
    bn = following_batchnorm(producer)
    gamma, beta = (_const(bn, 1), _const(bn, 2)) if bn is not None else (None, None)
    if gamma is None or beta is None or origin(gamma) not in grads or origin(beta) not in grads:
        return taylor_scores(producer, grads)
    g, b = gamma.const_value.numpy(), beta.const_value.numpy()
    dg = grads.batches(origin(gamma), g.shape, bn.name)
    db = grads.batches(origin(beta), b.shape, bn.name)
    return taylor_bn(g.astype(np.float64), b.astype(np.float64), dg, db)


def bn_scale_scores(producer: Producer) -> np.ndarray | None:
    """Network slimming: |γ| of the BatchNormalization after the layer; None without one."""
    bn = following_batchnorm(producer)
    gamma = _const(bn, 1) if bn is not None else None
    if gamma is None:
        return None
    return np.abs(gamma.const_value.numpy().astype(np.float64))


HGSR_FORMS = ("l1/2", "l2")


def hgsr_scores(analysis: Analysis, group: Group, form: str = "l1/2") -> np.ndarray:
    """HGSR's feature-wise group score (Mitsuno et al., ICPR 2020), from the consumer side.

    Channel i is scored by the weights that read it: for each consumer W[o, i, ...],
    `l1/2`: (Σ_o √‖W_{o,i}‖₁)², or `l2`: (Σ_o ‖W_{o,i}‖₂)², summed over consumers. A
    channel read at several positions (flatten into a linear layer) is one group.
    """
    position = {int(r): k for k, r in enumerate(group.classes)}
    scores = np.zeros(group.channels)
    for site in analysis.slices:
        if site.role != "consumer":
            continue
        classes = analysis.roots[site.ids]
        mine = np.array([int(c) in position for c in classes])
        if not mine.any():
            continue
        weight = site.node.inputs[site.input].const_value.numpy().astype(np.float64)
        # [positions read, outputs, rest]: the other channel axis of a layer weight is
        # its output axis (Conv [O, I, k..], ConvTranspose [I, O, k..], Gemm/MatMul 2-D).
        moved = np.moveaxis(weight, (site.axis, 1 - site.axis), (0, 1))
        moved = moved.reshape(moved.shape[0], moved.shape[1], -1)
        per_position = (np.abs(moved).sum(axis=2) if form == "l1/2"
                        else (moved ** 2).sum(axis=2))            # [P, O]
        for cls in np.unique(classes[mine]):
            block = per_position[classes == cls].sum(axis=0)     # ‖W_{o,i}‖₁ or ‖·‖₂² per o
            scores[position[int(cls)]] += np.sqrt(block).sum() ** 2
    return scores
