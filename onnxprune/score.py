"""Channel importance, computed with NumPy in float64 on the producers' filters.

A filter is the output-channel slice of a producer's weight, flattened. Lower
scores are pruned first. Weights are read in column chunks, so a large
memory-mapped layer is never copied to float64 whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from .analyze.graph import Analysis, Group
from .analyze.sites import Producer
from . import criteria
from .criteria import Gradients
from .errors import UsageError

_CHUNK_BYTES = 64 << 20


def filters(producer: Producer) -> np.ndarray:
    """The producer's filters as rows of a 2-D (possibly strided, memory-mapped) view."""
    weight = producer.node.inputs[producer.weight].const_value.numpy()
    moved = np.moveaxis(weight, producer.axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _column_chunks(f: np.ndarray, rows: int | None = None) -> Iterator[np.ndarray]:
    """float64 column blocks of `f`, each at most ~64 MB."""
    rows = f.shape[0] if rows is None else rows
    step = max(1, _CHUNK_BYTES // (8 * max(rows, 1)))
    for start in range(0, f.shape[1], step):
        yield np.asarray(f[:, start:start + step], dtype=np.float64)


def l1(f: np.ndarray) -> np.ndarray:
    return sum((np.abs(c).sum(axis=1) for c in _column_chunks(f)), np.zeros(f.shape[0]))


def _squared_norms(f: np.ndarray) -> np.ndarray:
    return sum((np.einsum("ij,ij->i", c, c) for c in _column_chunks(f)), np.zeros(f.shape[0]))


def l2(f: np.ndarray) -> np.ndarray:
    return np.sqrt(_squared_norms(f))


def distance_sums(f: np.ndarray, block_rows: int = 2048) -> np.ndarray:
    """Σ_j ‖F_i − F_j‖₂ for every row i, through the Gram matrix: ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b.

    Rows are processed in blocks, and columns in chunks, so memory stays
    O(block × n) for wide layers; a layer that fits in one chunk is converted to
    float64 once and its Gram matrix is one symmetric product.
    """
    n = f.shape[0]
    step = max(1, _CHUNK_BYTES // (8 * n))
    whole = np.asarray(f, dtype=np.float64) if f.shape[1] <= step else None
    norms = np.einsum("ij,ij->i", whole, whole) if whole is not None else _squared_norms(f)
    sums = np.zeros(n)
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        if whole is not None:
            d2 = whole @ whole.T if (r0, r1) == (0, n) else whole[r0:r1] @ whole.T
        else:
            d2 = np.zeros((r1 - r0, n))
            for c0 in range(0, f.shape[1], step):
                cols = np.asarray(f[:, c0:c0 + step], dtype=np.float64)
                d2 += cols[r0:r1] @ cols.T
        d2 *= -2.0
        d2 += norms[r0:r1, None]
        d2 += norms[None, :]
        np.maximum(d2, 0.0, out=d2)  # rounding can make tiny distances negative
        d2[np.arange(r1 - r0), np.arange(r0, r1)] = 0.0
        np.sqrt(d2, out=d2)
        sums[r0:r1] = d2.sum(axis=1)
    return sums


def fpgm(f: np.ndarray, norm_fraction: float = 0.0) -> np.ndarray:
    """FPGM (He et al., CVPR 2019): the filters nearest the geometric median score lowest.

    Paper form (norm_fraction=0): score_i = Σ_j ‖F_i − F_j‖₂ over all filters.
    Official-code variant (norm_fraction=f>0): the int(f·C) filters of smallest L2 norm
    are pruned first (they score below every other filter, in norm order), and the
    distance sums of the rest are computed among those survivors only.
    """
    if norm_fraction <= 0:
        return distance_sums(f)
    n = f.shape[0]
    norms = l2(f)
    order = np.argsort(norms, kind="stable")
    by_norm = order[: int(n * norm_fraction)]
    survivors = np.sort(order[int(n * norm_fraction):])
    scores = np.empty(n)
    if len(survivors):
        scores[survivors] = distance_sums(np.asarray(f[survivors]))
    # Strictly below the smallest survivor score, ordered by norm.
    floor = scores[survivors].min() if len(survivors) else 0.0
    scores[by_norm] = floor - 1.0 - np.arange(len(by_norm))[::-1]
    return scores


SCORERS: dict[str, Callable[..., np.ndarray]] = {"l1": l1, "l2": l2, "fpgm": fpgm}
GRADIENT_METHODS = ("taylor", "taylor-sq", "taylor-bn")
METHODS = (*SCORERS, "random", *GRADIENT_METHODS, "bn-scale", "hgsr")

NORMALIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda s: s / (np.abs(s).mean() or 1.0),
    "max": lambda s: s / (np.abs(s).max() or 1.0),
    "sum": lambda s: s / (np.abs(s).sum() or 1.0),
    "none": lambda s: s,
}
REDUCTIONS = ("mean", "sum", "max", "min")


def producer_scores(producer: Producer, method: str, grads: Gradients | None = None,
                    **options) -> np.ndarray | None:
    """One layer's scores per output channel; None where the criterion has nothing to say
    (bn-scale without a BatchNormalization after the layer)."""
    if method in GRADIENT_METHODS:
        if grads is None:
            raise UsageError(f"--method {method} needs --grads FILE.npz")
        if method == "taylor-bn":
            return criteria.taylor_bn_scores(producer, grads)
        return criteria.taylor_scores(producer, grads, squared=method == "taylor-sq")
    if method == "bn-scale":
        return criteria.bn_scale_scores(producer)
    if method not in SCORERS:
        raise UsageError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    f = filters(producer)
    scores = SCORERS[method](f, **options) if method == "fpgm" else SCORERS[method](f)
    del f  # the view pins the memory map
    release(producer.node.inputs[producer.weight].const_value)
    return scores


def release(tensor) -> None:
    """Unmap a memory-mapped weight once read, so resident memory stays near one layer.

    Best effort: a map still referenced elsewhere stays mapped."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass


def score_group(analysis: Analysis, group: Group, method: str, *, normalizer: str = "mean",
                reduction: str = "mean", rng: np.random.Generator | None = None,
                **options) -> np.ndarray:
    """One score per channel of the group.

    Each producer's scores are normalized per layer (divided by their mean, by
    default), then the scores of the producer channels that make up one group
    channel are reduced (mean, by default).
    """
    if method == "random":
        rng = rng or np.random.default_rng(0)
        return rng.random(group.channels)
    if method == "hgsr":
        return criteria.hgsr_scores(analysis, group, options.get("hgsr_form", "l1/2"))
    options.pop("hgsr_form", None)
    position = {int(r): k for k, r in enumerate(group.classes)}
    where, values = [], []
    for producer in group.producers:
        s = producer_scores(producer, method, **options)
        if s is None:
            continue
        values.append(NORMALIZERS[normalizer](s))
        where.append([position[int(r)] for r in analysis.roots[producer.ids]])
    if not values:  # no producer of this group can be scored: keep all its channels
        return np.full(group.channels, np.inf)
    where, values = np.concatenate(where), np.concatenate(values)
    # Reduce the scores of the producer channels that make up each group channel.
    if reduction in ("mean", "sum"):
        out = np.bincount(where, weights=values, minlength=group.channels)
        count = np.bincount(where, minlength=group.channels)
        out[count == 0] = np.inf  # channels no scored layer produces are kept
        return out / np.maximum(count, 1) if reduction == "mean" else out
    out = np.full(group.channels, -np.inf if reduction == "max" else np.inf)
    (np.maximum if reduction == "max" else np.minimum).at(out, where, values)
    return out


def score(analysis: Analysis, method: str, *, seed: int = 0, groups: list[Group] | None = None,
          progress: Callable[[Group], None] | None = None, **options) -> dict[int, np.ndarray]:
    """Scores for every prunable group, keyed by group index."""
    if method not in METHODS:
        raise UsageError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    for key, table in (("normalizer", NORMALIZERS), ("reduction", REDUCTIONS)):
        if options.get(key, "mean") not in table:
            raise UsageError(f"unknown {key} '{options[key]}' (choose from {', '.join(table)})")
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for group in groups if groups is not None else analysis.groups:
        if group.prunable:
            out[group.index] = score_group(analysis, group, method, rng=rng, **options)
        if progress:
            progress(group)
    if method == "bn-scale" and out and not any(np.isfinite(v).any() for v in out.values()):
        raise UsageError("--method bn-scale needs an unfused BatchNormalization after the "
                         "pruned layers, and this model has none (the exporter probably "
                         "folded BN into the convolutions); choose another method")
    return out
