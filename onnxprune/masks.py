"""A scoring copy of the model whose channels are switched off by an input, not by surgery.

Every layer that reads prunable channels (Conv, ConvTranspose, Gemm, MatMul) gets its
data input multiplied by a 0/1 mask along the channel axis. With the mask at zero for
some channels, the copy computes exactly what the model pruned of those channels
computes (removal equals zeroing, and only the reading layers see a channel), so
greedy selection and sensitivity sweeps run one onnxruntime session with many masks
instead of rebuilding a model per candidate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from .analyze import Analysis, analyze
from .load import load_normalized
from .validate import session

MASK_INPUT = "onnxprune_mask"


class MaskedModel:
    """The model with one extra input, `onnxprune_mask` [K+1]: entry k switches candidate
    channel k (a channel class of a prunable group) on (1) or off (0); entry K is 1."""

    def __init__(self, path: str | os.PathLike, exclude: Iterable[str] = (), threads: int = 1):
        # The analysis comes from the unmodified copy: its groups and indices are the
        # ones a pruning run on the same file finds.
        self.analysis: Analysis = analyze(load_normalized(path), exclude)
        scoring = analyze(load_normalized(path), exclude)
        self.candidates = np.array([int(r) for g in self.analysis.groups if g.prunable
                                    for r in g.classes], dtype=np.int64)
        self._index = {int(r): k for k, r in enumerate(self.candidates)}
        self._insert_masks(scoring)
        self.session = session(scoring.model, threads)
        self.input_names = [i.name for i in self.session.get_inputs() if i.name != MASK_INPUT]

    def _insert_masks(self, scoring: Analysis) -> None:
        graph = scoring.model.graph
        k = len(self.candidates)
        mask = ir.Value(name=MASK_INPUT, shape=ir.Shape([k + 1]),
                        type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(mask)
        for n, read in enumerate(scoring.reads):
            index = np.array([self._index.get(int(r), k) for r in scoring.roots[read.ids]],
                             dtype=np.int64)
            if (index == k).all():
                continue
            shape = np.ones(read.rank - read.axis, dtype=np.int64)
            shape[0] = len(index)
            consts = []
            for name, array in ((f"onnxprune_mask_index_{n}", index),
                                (f"onnxprune_mask_shape_{n}", shape)):
                value = ir.Value(name=name, shape=ir.Shape(array.shape),
                                 type=ir.TensorType(ir.DataType.INT64),
                                 const_value=ir.tensor(array, name=name))
                graph.register_initializer(value)
                consts.append(value)
            gather = ir.Node("", "Gather", [mask, consts[0]], num_outputs=1,
                             attributes=[ir.AttrInt64("axis", 0)])
            reshape = ir.Node("", "Reshape", [gather.outputs[0], consts[1]], num_outputs=1)
            data = read.node.inputs[read.input]
            mul = ir.Node("", "Mul", [data, reshape.outputs[0]], num_outputs=1)
            graph.insert_before(read.node, [gather, reshape, mul])
            read.node.replace_input_with(read.input, mul.outputs[0])

    def mask(self, removed: Iterable[int] = ()) -> np.ndarray:
        """The mask vector with the given channel classes switched off."""
        vector = np.ones(len(self.candidates) + 1, dtype=np.float32)
        for cls in removed:
            vector[self._index[int(cls)]] = 0.0
        return vector

    def run(self, x: np.ndarray, removed: Iterable[int] = (), batch: int = 256) -> np.ndarray:
        """The first output on `x` (fed to the first input), with channels removed."""
        vector = self.mask(removed)
        name = self.input_names[0]
        outs = [self.session.run(None, {name: x[i:i + batch], MASK_INPUT: vector})[0]
                for i in range(0, len(x), batch)]
        return np.concatenate(outs)


def cross_entropy(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of class scores (logits, or probabilities if rows sum to 1)."""
    outputs = outputs.astype(np.float64).reshape(len(outputs), -1)
    if (outputs >= 0).all() and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-4):
        log_p = np.log(np.clip(outputs, 1e-12, None))
    else:
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(targets)), targets].mean())


__all__ = ["MaskedModel", "MASK_INPUT", "cross_entropy"]
