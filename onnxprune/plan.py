"""Which channels go: a uniform per-group ratio, rounding, and the plan file.

A selection maps a group index to the sorted positions (0..C-1) of the group
channels to remove. The plan file records it by producer name and output
channel, plus every constant that the surgery sliced.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .analyze.graph import Analysis, Group
from .errors import InputError, UnsupportedModelError, UsageError
from .load import origin
from .metrics import node_costs

PLAN_FORMAT = "onnxprune-plan/1"
Selection = dict[int, np.ndarray]


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 <= ratio < 1):
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    return float(ratio)


def check_target_macs(target_macs: float) -> float:
    if not (isinstance(target_macs, (int, float)) and 0 < target_macs <= 1):
        raise UsageError(f"--target-macs must be in (0, 1], got {target_macs}")
    return float(target_macs)


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


class MacsModel:
    """MACs of the model under any selection, without surgery.

    A layer's MACs are proportional to the size of each channel axis of its weight
    (Conv: out × in/group × kernel × output positions; Gemm/MatMul: M × K × N), so
    pruned MACs = original MACs × Π over its weight's sliced axes of kept/original.
    Kept counts are updated incrementally as channels are removed.
    """

    def __init__(self, analysis: Analysis):
        costs = node_costs(analysis.model)
        self.total0 = float(sum(c.macs for c in costs.values()))
        self._node_macs0: dict[str, float] = {}
        self._sites: list[tuple[str, int]] = []          # (node, original length)
        self._kept: list[int] = []
        self._by_class: dict[int, list[tuple[int, int]]] = {}  # class -> [(site, count)]
        self._node_sites: dict[str, list[int]] = {}
        for site in analysis.slices:
            name = site.node.name
            if site.input != 1 or costs.get(name) is None or costs[name].macs == 0:
                continue
            index = len(self._sites)
            self._sites.append((name, len(site.ids)))
            self._kept.append(len(site.ids))
            self._node_sites.setdefault(name, []).append(index)
            self._node_macs0[name] = float(costs[name].macs)
            classes, counts = np.unique(analysis.roots[site.ids], return_counts=True)
            for cls, count in zip(classes.tolist(), counts.tolist()):
                self._by_class.setdefault(cls, []).append((index, count))
        self.total = self.total0

    def _node_macs(self, name: str) -> float:
        factor = 1.0
        for index in self._node_sites[name]:
            factor *= self._kept[index] / self._sites[index][1]
        return self._node_macs0[name] * factor

    def remove(self, cls: int, sign: int = 1) -> None:
        """Remove one channel class (sign=-1 puts it back)."""
        touched = {self._sites[i][0] for i, _ in self._by_class.get(cls, [])}
        before = sum(self._node_macs(n) for n in touched)
        for index, count in self._by_class.get(cls, []):
            self._kept[index] -= sign * count
        self.total += sum(self._node_macs(n) for n in touched) - before

    def of(self, analysis: Analysis, selection: Selection) -> float:
        for cls in removed_roots(analysis, selection):
            self.remove(cls)
        value = self.total
        for cls in removed_roots(analysis, selection):
            self.remove(cls, -1)
        return value


def parse_ratio_for(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        pattern, sep, value = spec.rpartition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = None
        if not sep or not pattern or ratio is None:
            raise UsageError(f"--ratio-for takes PATTERN=RATIO, got '{spec}'")
        out.append((pattern, check_ratio(ratio)))
    return out


def _group_ratio(group: Group, ratio: float, ratio_for: list[tuple[str, float]]) -> float:
    names = [n for p in group.producers for n in (p.node.name, origin(p.node.inputs[p.weight]))]
    for pattern, value in ratio_for:  # the last matching pattern wins
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            ratio = value
    return ratio


def _cap(group: Group, max_layer_ratio: float) -> int:
    """The most channels a group may lose: never all, never beyond --max-layer-ratio."""
    return min(group.channels - 1, math.floor(max_layer_ratio * group.channels + 1e-9))


def _lowest(scores: np.ndarray, n: int) -> np.ndarray:
    finite = np.flatnonzero(np.isfinite(scores))  # unscored channels are never removed
    order = finite[np.argsort(scores[finite], kind="stable")]
    return np.sort(order[:n])


def _local(analysis, scores, ratio, round_to, ratio_for, max_layer_ratio) -> Selection:
    selection: Selection = {}
    for group in analysis.groups:
        if group.index not in scores or not group.prunable:
            continue
        r = _group_ratio(group, ratio, ratio_for)
        n = min(channels_to_remove(group.channels, r, round_to), _cap(group, max_layer_ratio))
        if n > 0:
            chosen = _lowest(scores[group.index], n)
            if len(chosen):
                selection[group.index] = chosen
    return selection


def _global_order(analysis, scores) -> list[tuple[int, int]]:
    """Every candidate channel, lowest (per-layer normalized) score first."""
    entries = [(float(s), g, k) for g, values in scores.items() if analysis.groups[g].prunable
               for k, s in enumerate(values) if np.isfinite(s)]
    entries.sort()
    return [(g, k) for _, g, k in entries]


def _round_down(analysis, scores, selection: Selection, round_to: int) -> Selection:
    """Remove fewer channels where needed, so every kept count is a multiple of round_to."""
    if round_to <= 1:
        return selection
    out: Selection = {}
    for g, positions in selection.items():
        channels = analysis.groups[g].channels
        keep = min(channels, math.ceil((channels - len(positions)) / round_to) * round_to)
        n = channels - keep
        if n > 0:
            ranked = positions[np.argsort(scores[g][positions], kind="stable")]
            out[g] = np.sort(ranked[:n])
    return out


def _global(analysis, scores, ratio, round_to, ratio_for, max_layer_ratio,
            macs: MacsModel | None = None, target: float | None = None) -> Selection:
    groups = {g.index: g for g in analysis.groups}
    budget = sum(math.floor(_group_ratio(groups[g], ratio, ratio_for) * groups[g].channels + 1e-9)
                 for g in scores if groups[g].prunable)
    taken: dict[int, list[int]] = {}
    count = 0
    for g, k in _global_order(analysis, scores):
        if target is not None and macs.total <= target:
            break
        if target is None and count >= budget:
            break
        if len(taken.get(g, [])) >= _cap(groups[g], max_layer_ratio):
            continue
        taken.setdefault(g, []).append(k)
        count += 1
        if macs is not None:
            macs.remove(int(groups[g].classes[k]))
    selection = {g: np.array(sorted(p), dtype=np.int64) for g, p in taken.items()}
    return selection if target is not None else _round_down(analysis, scores, selection, round_to)


def select(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float,
           round_to: int = 1, *, scope: str = "local", ratio_for: list[tuple[str, float]] = (),
           max_layer_ratio: float = 1.0, target_macs: float | None = None) -> Selection:
    """Choose the channels to remove.

    - local scope: floor(r·C) of every group's lowest-scored channels (the papers'
      uniform rate; `ratio_for` overrides r per layer pattern).
    - global scope: all channels ranked together by their per-layer normalized scores;
      as many channels in all as the local rule would take.
    - `target_macs` F: prune until the model's MACs are at most F of the original.
      Local: the smallest uniform ratio that meets it; global: the globally
      lowest-scored channels, one at a time, until it is met.
    `max_layer_ratio` caps the fraction any group may lose; no group is ever emptied.
    """
    check_ratio(ratio)
    if scope not in ("local", "global"):
        raise UsageError(f"--scope must be local or global, got '{scope}'")
    if not 0 < max_layer_ratio <= 1:
        raise UsageError("--max-layer-ratio must be in (0, 1]")
    if target_macs is None:
        if scope == "local":
            selection = _local(analysis, scores, ratio, round_to, ratio_for, max_layer_ratio)
        else:
            selection = _global(analysis, scores, ratio, round_to, ratio_for, max_layer_ratio)
        return keep_every_tensor_nonempty(analysis, selection, scores)
    check_target_macs(target_macs)
    macs = MacsModel(analysis)
    target = target_macs * macs.total0
    if scope == "global":
        selection = _global(analysis, scores, ratio, round_to, ratio_for, max_layer_ratio,
                            macs, target)
    else:
        def at(r: float) -> Selection:
            return _local(analysis, scores, r, round_to, ratio_for, max_layer_ratio)
        lo, hi = 0.0, 0.999999
        if macs.of(analysis, at(hi)) > target:
            lo = hi
        else:
            for _ in range(40):  # the smallest uniform ratio that meets the target
                mid = (lo + hi) / 2
                if macs.of(analysis, at(mid)) <= target:
                    hi = mid
                else:
                    lo = mid
        selection = at(hi)
    selection = keep_every_tensor_nonempty(analysis, selection, scores)
    reached = macs.of(analysis, selection)
    if reached > target * (1 + 1e-9):
        raise UsageError(f"cannot reach --target-macs {target_macs:g}: at most "
                         f"{1 - reached / macs.total0:.1%} of the MACs can be removed here "
                         f"(frozen groups and caps keep the rest)")
    return selection


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
