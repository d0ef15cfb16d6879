"""HGSR's loss-based greedy channel selection (Mitsuno, Miyao and Kurita, ICPR 2020).

Candidates are ranked globally by the feature-wise score (criteria.hgsr_scores). At
each step, each group offers its `candidates` lowest-scored remaining channels; the
one whose removal raises the cross-entropy on the sampled training data least is
removed. Steps repeat until as many channels are gone as the ratio asks (floor(r·C)
per group, summed), or, with `target_macs`, until the model's MACs are at most that
fraction of the original's (the ratio is then ignored; `max_layer_ratio` still caps).
With `round_to`, a step removes an aligned block instead of one channel. Each candidate
costs one onnxruntime run of the masked model on the samples, so a run costs about
steps × groups × candidates model evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .analyze import Analysis
from .masks import MaskedModel, cross_entropy
from .plan import MacsModel, Selection, _cap, _group_ratio, check_target_macs


def sample(x: np.ndarray, y: np.ndarray | None, count: int, seed: int):
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(count, len(x)), replace=False))
    return x[pick], (y[pick] if y is not None else None)


def greedy_select(masked: MaskedModel, scores: dict[int, np.ndarray], x: np.ndarray,
                  targets: np.ndarray, ratio: float, *, candidates: int = 1,
                  ratio_for=(), max_layer_ratio: float = 1.0,
                  target_macs: float | None = None, round_to: int = 1,
                  on_step: Callable[[], None] | None = None) -> tuple[Selection, list[dict]]:
    """Returns the selection and the trace: one entry per step, with its loss.

    With `round_to` > 1 a step removes a block: a group's lowest-scored remaining channels,
    as many as bring its kept count to the next lower multiple of `round_to` (so counts
    stay aligned, as `--round-to` does for the other methods); `candidates` then does not
    apply."""
    a: Analysis = masked.analysis
    groups = {g.index: g for g in a.groups if g.prunable and g.index in scores}
    macs = MacsModel(a) if target_macs is not None else None
    if macs is not None:
        check_target_macs(target_macs)
        budget = sum(g.channels for g in groups.values())  # the MACs target stops it
    else:
        budget = sum(math.floor(_group_ratio(g, ratio, ratio_for) * g.channels + 1e-9)
                     for g in groups.values())
    order = {i: list(np.argsort(scores[i], kind="stable")) for i in groups}
    removed: dict[int, list[int]] = {i: [] for i in groups}
    removed_classes: list[int] = []
    trace = []
    while sum(len(p) for p in removed.values()) < budget:
        if macs is not None and macs.total <= target_macs * macs.total0:
            break
        offers = []
        for i, g in groups.items():
            remaining = [int(k) for k in order[i] if k not in removed[i]]
            if round_to > 1:
                block = (len(remaining) % round_to) or round_to
                if len(removed[i]) + block <= _cap(g, max_layer_ratio):
                    offers.append((i, remaining[:block]))
            elif len(removed[i]) < _cap(g, max_layer_ratio):
                offers += [(i, [k]) for k in remaining[:candidates]]
        if not offers:
            break
        losses = [cross_entropy(masked.run(x, [*removed_classes, *(int(groups[i].classes[k])
                                                                      for k in block)]),
                                targets) for i, block in offers]
        best = int(np.argmin(losses))
        i, block = offers[best]
        for k in block:
            removed[i].append(k)
            removed_classes.append(int(groups[i].classes[k]))
            if macs is not None:
                macs.remove(removed_classes[-1])
        trace.append({"group": i, "channels": block, "loss": losses[best]})
        if on_step:
            on_step()
    selection = {i: np.array(sorted(p), dtype=np.int64) for i, p in removed.items() if p}
    return selection, trace


def targets_for(masked: MaskedModel, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Labels if given, else the original model's own predictions."""
    if y is not None:
        return y.astype(np.int64), "labels"
    return masked.run(x).reshape(len(x), -1).argmax(axis=1), "the original model's predictions"
