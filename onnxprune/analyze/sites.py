"""What the surgery must change once channels are chosen: recorded by the op rules.

Each record is written by the same rule that decided how channels flow through
the op, so analysis and surgery cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

#: Given channel ids, says which are kept (boolean array of the same shape).
Alive = Callable[[np.ndarray], np.ndarray]


@dataclass
class Producer:
    """A layer whose output channels are candidates: `weight` input, sliced on `axis`."""

    node: ir.Node
    weight: int
    axis: int
    ids: np.ndarray


@dataclass
class SliceSite:
    """Constant input `input` of `node` loses the positions along `axis` whose ids are removed.

    `role` says why: "producer" (a layer's output filters), "consumer" (a layer's weights
    that read the channels: the feature-wise groups of HGSR), or "param" (biases,
    normalization parameters, per-channel constants, depthwise filters).
    """

    node: ir.Node
    input: int
    axis: int
    ids: np.ndarray
    role: str = "param"


@dataclass
class Read:
    """Layer `node` reads channels `ids` on `axis` of its data input `input`.

    Multiplying that input by a 0/1 mask on those positions computes exactly what the
    pruned model computes: a score-time stand-in for surgery (see masks.py)."""

    node: ir.Node
    input: int
    axis: int
    ids: np.ndarray
    rank: int


@dataclass
class ConstRewrite:
    """A small shape-like constant input (Reshape shape, Slice ends, Resize sizes) is recomputed."""

    node: ir.Node
    input: int
    compute: Callable[[Alive], np.ndarray]


@dataclass
class AttrRewrite:
    """An attribute (Conv group, Split sizes before opset 13, Slice ends before opset 10)."""

    node: ir.Node
    name: str
    compute: Callable[[Alive], Any]


@dataclass
class SplitRewrite:
    """Split sizes along the channel axis, one id array per output; written as explicit sizes."""

    node: ir.Node
    axis: int
    parts: list[np.ndarray]
