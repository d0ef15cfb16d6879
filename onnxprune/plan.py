"""Which channels go: a uniform per-group ratio, rounding, and the plan file.

A selection maps a group index to the sorted positions (0..C-1) of the group
channels to remove. The plan file records it by producer name and output
channel, plus every constant that the surgery sliced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .analyze.graph import Analysis, Group
from .errors import InputError, UnsupportedModelError, UsageError
from .load import origin

PLAN_FORMAT = "onnxprune-plan/1"
Selection = dict[int, np.ndarray]


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 <= ratio < 1):
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    return float(ratio)


def channels_to_remove(channels: int, ratio: float, round_to: int = 1) -> int:
    """floor(ratio·C) channels, fewer if needed so the kept count is a multiple of
    `round_to`; never all of them."""
    if round_to < 1:
        raise UsageError(f"--round-to must be at least 1, got {round_to}")
    keep = channels - math.floor(ratio * channels + 1e-9)
    if round_to > 1:
        keep = min(channels, math.ceil(keep / round_to) * round_to)
    keep = max(keep, 1)
    return channels - keep


def select(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float,
           round_to: int = 1) -> Selection:
    """The lowest-scored channels of every scored group, at one uniform ratio."""
    check_ratio(ratio)
    selection: Selection = {}
    for group in analysis.groups:
        if group.index not in scores or not group.prunable:
            continue
        n = channels_to_remove(group.channels, ratio, round_to)
        if n > 0:
            order = np.argsort(scores[group.index], kind="stable")
            selection[group.index] = np.sort(order[:n])
    return keep_every_tensor_nonempty(analysis, selection, scores)


def keep_every_tensor_nonempty(analysis: Analysis, selection: Selection,
                               scores: dict[int, np.ndarray]) -> Selection:
    """A Split output or a Slice may hold only a few channels of a group; never let a
    selection empty one: give back its best-scored channel."""
    position = {int(r): (g.index, k) for g in analysis.groups for k, r in enumerate(g.classes)}
    parts = [part for rewrite in analysis.split_rewrites for part in rewrite.parts] + \
        [site.ids for site in analysis.slices]
    selection = {i: set(map(int, p)) for i, p in selection.items()}
    changed = True
    while changed:
        changed = False
        alive = analysis.alive(removed_roots(analysis, selection))
        for part in parts:
            if len(part) == 0 or alive(part).any():
                continue
            candidates = [position[int(r)] for r in set(analysis.roots[part].tolist())
                          if int(r) in position]
            if not candidates:
                continue
            index, k = max(candidates, key=lambda c: scores[c[0]][c[1]])
            selection[index].discard(k)
            changed = True
            break
    return {i: np.array(sorted(p), dtype=np.int64) for i, p in selection.items() if p}


def removed_roots(analysis: Analysis, selection: Selection) -> set[int]:
    groups = {g.index: g for g in analysis.groups}
    return {int(groups[i].classes[k]) for i, positions in selection.items() for k in positions}


def _producer_channels(analysis: Analysis, group: Group, positions: np.ndarray) -> list[dict]:
    removed = set(int(group.classes[k]) for k in positions)
    out = []
    for p in group.producers:
        channels = [int(c) for c, r in enumerate(analysis.roots[p.ids]) if int(r) in removed]
        out.append({"node": p.node.name, "weight": origin(p.node.inputs[p.weight]),
                    "channels": channels})
    return out


def plan_document(analysis: Analysis, selection: Selection, *, model: str, method: str,
                  ratio: float | None, options: dict[str, Any], slices: list[dict],
                  updates: list[dict]) -> dict:
    groups = []
    for g in analysis.groups:
        positions = selection.get(g.index, np.zeros(0, np.int64))
        groups.append({
            "id": g.index,
            "channels": g.channels,
            "kept": g.channels - len(positions),
            "removed": [int(k) for k in positions],
            "producers": _producer_channels(analysis, g, positions),
            "frozen": g.frozen or None,
        })
    return {"format": PLAN_FORMAT, "model": model, "method": method, "ratio": ratio,
            "options": options, "groups": groups, "slices": slices, "updates": updates}


def write_plan(document: dict, path: str | Path) -> None:
    from .report import write_text_atomic

    write_text_atomic(path, json.dumps(document, indent=1) + "\n")


def read_plan(path: str | Path) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no such plan file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a JSON plan file ({exc.__class__.__name__})") from None
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        raise InputError(f"{path} is not an {PLAN_FORMAT} plan file")
    return document


def selection_from_plan(analysis: Analysis, document: dict) -> Selection:
    """Map a plan's removed producer channels onto this model's groups."""
    by_node = {p.node.name: p for p in analysis.producers}
    class_group = {int(r): g for g in analysis.groups for r in g.classes}
    removed: dict[int, set[int]] = {}
    try:
        for entry in document["groups"]:
            for producer in entry["producers"]:
                if not producer["channels"]:
                    continue
                p = by_node.get(producer["node"])
                if p is None or len(p.ids) <= max(producer["channels"]):
                    raise UnsupportedModelError(
                        f"plan does not fit this model: no layer '{producer['node']}' with "
                        f"{max(producer['channels']) + 1}+ output channels")
                for c in producer["channels"]:
                    root = int(analysis.roots[p.ids[c]])
                    g = class_group[root]
                    if not g.prunable:
                        raise UnsupportedModelError(
                            f"plan does not fit this model: channel {c} of '{p.node.name}' "
                            f"is frozen here ({'; '.join(g.frozen)})")
                    removed.setdefault(g.index, set()).add(int(np.where(g.classes == root)[0][0]))
    except (KeyError, TypeError) as exc:
        raise InputError(f"malformed plan file: missing or bad field {exc}") from None
    for index, positions in removed.items():
        g = analysis.groups[index]
        if len(positions) >= g.channels:
            raise UnsupportedModelError(f"plan removes every channel of group {index}")
    return {i: np.array(sorted(p), dtype=np.int64) for i, p in removed.items()}
