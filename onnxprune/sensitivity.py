"""Per-group sensitivity: prune one group at a time at ratios 0.1…0.9 and measure.

With labels the measure is top-1 accuracy; without, agreement with the original:
top-1 match for a classifier's 2-D output, else 1 − ‖Δ‖/‖y‖ of the first output.
All runs use one masked onnxruntime session (masks.py), so no model is rebuilt.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import InputError, UsageError
from .masks import MaskedModel
from .plan import MacsModel, Selection, _lowest, channels_to_remove, check_target_macs

FORMAT = "onnxprune-sensitivity/1"
DEFAULT_RATIOS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def _measure(out: np.ndarray, reference: np.ndarray, y: np.ndarray | None) -> float:
    if y is not None:
        return float((out.reshape(len(out), -1).argmax(axis=1) == y).mean())
    if out.ndim == 2 and out.shape[1] > 1:
        return float((out.argmax(axis=1) == reference.argmax(axis=1)).mean())
    scale = float(np.linalg.norm(reference)) or 1.0
    return 1.0 - float(np.linalg.norm(out.astype(np.float64) - reference)) / scale


def sweep(masked: MaskedModel, scores: dict[int, np.ndarray], x: np.ndarray,
          y: np.ndarray | None, ratios=DEFAULT_RATIOS, *, model: str = "", method: str = "",
          on_step: Callable[[], None] | None = None) -> dict:
    a = masked.analysis
    macs = MacsModel(a)
    reference = masked.run(x)
    if y is not None and (reference.ndim != 2 or reference.shape[1] < 2):
        y = None  # labels only make sense for a classifier's scores
    baseline = _measure(reference, reference, y)
    groups = []
    for g in a.groups:
        if not g.prunable or g.index not in scores:
            continue
        points = []
        for r in ratios:
            n = channels_to_remove(g.channels, r, 1)
            positions = _lowest(scores[g.index], n)
            removed = [int(g.classes[k]) for k in positions]
            value = _measure(masked.run(x, removed), reference, y) if removed else baseline
            points.append({"ratio": r, "removed": len(removed), "value": value,
                           "macs": macs.of(a, {g.index: positions})})
            if on_step:
                on_step()
        groups.append({"id": g.index, "producers": [p.node.name for p in g.producers],
                       "channels": g.channels, "points": points})
    return {"format": FORMAT, "model": model, "method": method,
            "metric": "accuracy" if y is not None else "agreement",
            "samples": len(x), "baseline": baseline, "macs": macs.total0, "groups": groups}


def read_sensitivity(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no such sensitivity file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path} is not a JSON sensitivity file") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(f"{path} is not an {FORMAT} file")
    return document


def allocate(analysis, scores: dict[int, np.ndarray], document: dict, target_macs: float,
             round_to: int = 1) -> Selection:
    """Per-group ratios from a sweep that meet a MACs budget, pruning the least sensitive
    groups most: repeatedly raise, by one measured step, the ratio of the group whose
    next step loses the least of the metric per MAC saved."""
    check_target_macs(target_macs)
    groups = {g.index: g for g in analysis.groups if g.prunable and g.index in scores}
    curves = {}
    for entry in document.get("groups", []):
        g = groups.get(entry.get("id"))
        if g is None or g.channels != entry.get("channels"):
            raise InputError("the sensitivity file does not fit this model "
                             f"(group {entry.get('id')})")
        curves[g.index] = [(0.0, document["baseline"])] + \
            [(p["ratio"], p["value"]) for p in entry["points"]]
    macs = MacsModel(analysis)
    target = target_macs * macs.total0
    level = {i: 0 for i in curves}

    def selection_at(levels: dict[int, int]) -> Selection:
        out = {}
        for i, lv in levels.items():
            n = channels_to_remove(groups[i].channels, curves[i][lv][0], round_to)
            if n:
                out[i] = _lowest(scores[i], n)
        return out

    current = macs.of(analysis, selection_at(level))
    while current > target:
        best = None
        for i, lv in level.items():
            # The next measured ratio that saves MACs (rounding can make steps empty).
            for nxt in range(lv + 1, len(curves[i])):
                trial = macs.of(analysis, selection_at({**level, i: nxt}))
                if trial < current:
                    cost = max(0.0, curves[i][lv][1] - curves[i][nxt][1]) / (current - trial)
                    if best is None or cost < best[0]:
                        best = (cost, i, nxt, trial)
                    break
        if best is None:
            raise UsageError(f"cannot reach --target-macs {target_macs:g} with the ratios in "
                             "the sensitivity file")
        _, i, level[i], current = best
    return selection_at(level)


def plot(document: dict, path: str | os.PathLike) -> None:
    """One curve per group: the metric against the group's pruning ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = document["groups"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    cmap = plt.get_cmap("viridis", max(len(groups), 2))
    for k, g in enumerate(groups):
        xs = [0.0] + [p["ratio"] for p in g["points"]]
        ys = [document["baseline"]] + [p["value"] for p in g["points"]]
        name = g["producers"][0] if g["producers"] else ""
        ax.plot(xs, ys, marker="o", markersize=3, color=cmap(k),
                label=f"g{g['id']} {name[:28]} ({g['channels']})")
    ax.axhline(document["baseline"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("fraction of the group's channels removed (this group alone)")
    ax.set_ylabel("top-1 accuracy" if document["metric"] == "accuracy"
                  else "agreement with the original")
    ax.set_title(f"Sensitivity of {Path(document['model']).name} ({document['method']}, "
                 f"{document['samples']} samples)")
    ax.grid(alpha=0.3)
    ncol = max(1, math.ceil(len(groups) / 18))
    ax.legend(fontsize=7, ncol=ncol, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
