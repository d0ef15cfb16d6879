"""Channel identities and how they sit on a tensor's axes.

Every output channel of a prunable layer gets an integer id. Ops move ids
around (concat, split, transpose, reshape) and couple them (a residual add
unifies the ids of its operands position by position). A union-find over ids
gives the *channel classes*: the sets of channels that must be removed together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class IdSpace:
    """Union-find over channel ids, with freeze reasons attached to classes."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._frozen: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, count: int, frozen: str | None = None) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        ids = np.arange(start, start + count, dtype=np.int64)
        if frozen:
            self.freeze(ids, frozen)
        return ids

    def find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        if rb in self._frozen:
            self._frozen.setdefault(ra, []).extend(self._frozen.pop(rb))

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(np.ravel(a), np.ravel(b)):
            self.union(x, y)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        roots = {self.find(int(i)) for i in np.ravel(ids)}
        for root in roots:
            reasons = self._frozen.setdefault(root, [])
            if reason not in reasons:
                reasons.append(reason)

    def frozen_reasons(self, root: int) -> list[str]:
        return self._frozen.get(self.find(root), [])

    def roots(self) -> np.ndarray:
        """The class of every id, as one array (valid once analysis is done)."""
        return np.array([self.find(i) for i in range(len(self._parent))], dtype=np.int64)


@dataclass
class ChannelMap:
    """Which channel id sits at each position of some axes of a tensor.

    `axes` are sorted absolute axes of a tensor of rank `rank`; `ids` has one
    dimension per axis. Positions along all other axes carry no channel identity.
    Most maps have a single axis; a channel axis split in two by a reshape
    (channel shuffle) gives a two-axis map.
    """

    rank: int
    axes: tuple[int, ...]
    ids: np.ndarray

    @property
    def axis(self) -> int | None:
        """The single mapped axis, or None for a multi-axis map."""
        return self.axes[0] if len(self.axes) == 1 else None

    def shifted(self, rank: int) -> ChannelMap:
        """The same map seen in a broadcast result of higher rank (aligned to the right)."""
        return ChannelMap(rank, tuple(a + rank - self.rank for a in self.axes), self.ids)

    def renumbered(self, rank: int, mapping: dict[int, int]) -> ChannelMap:
        return ChannelMap(rank, tuple(mapping[a] for a in self.axes), self.ids)

    def flat(self) -> np.ndarray:
        return np.ravel(self.ids)
