"""Vectorized id -> slot index: open addressing with linear probing in two numpy arrays.

Every operation takes a whole batch and probes all its keys at once, one numpy round per probe step,
so the Python cost is per probe round (a handful at load <= 0.5), never per key. Deleted keys leave
tombstones; the table is rebuilt (vectorized re-insert) when live + tombstones pass 70% of the capacity.
Keys are non-negative int64 ids, so -1 (empty) and -2 (tombstone) are free as markers.
"""

from __future__ import annotations

import numpy as np

from recmix.platform.hashing import mix64

EMPTY = np.int64(-1)
TOMB = np.int64(-2)


class HashIndex:
    def __init__(self, max_keys: int):
        cap = 1 << max(10, int(2 * max_keys - 1).bit_length())     # load factor <= 0.5 at max_keys
        self.mask = np.uint64(cap - 1)
        self.keys = np.full(cap, EMPTY, np.int64)
        self.vals = np.full(cap, -1, np.int64)     # touched now: a fixed cost, not growth under load
        self.live = 0
        self.tombs = 0

    def _home(self, q: np.ndarray) -> np.ndarray:
        return (mix64(q) & self.mask).astype(np.int64)

    def _find(self, q: np.ndarray) -> np.ndarray:
        """Table position of each key, -1 where absent."""
        pos = self._home(q)
        out = np.full(q.shape[0], -1, np.int64)
        act = np.arange(q.shape[0])
        m = int(self.mask)
        while act.size:
            p = pos[act]
            k = self.keys[p]
            hit = k == q[act]
            out[act[hit]] = p[hit]
            go = ~(hit | (k == EMPTY))
            act = act[go]
            pos[act] = (p[go] + 1) & m
        return out

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        pos = self._find(q)
        return np.where(pos >= 0, self.vals[np.maximum(pos, 0)], -1)

    def insert(self, q: np.ndarray, slots: np.ndarray) -> None:
        """Insert unique keys that are not present (the caller looked them up first)."""
        if self.live + self.tombs + q.shape[0] > 0.7 * self.keys.shape[0]:
            self._rebuild(extra=q.shape[0])
        pos = self._home(q)
        act = np.arange(q.shape[0])
        m = int(self.mask)
        while act.size:
            p = pos[act]
            k = self.keys[p]
            free = (k == EMPTY) | (k == TOMB)
            # Several keys may want the same free position this round: scatter them all, the one that
            # reads back won (numpy keeps one writer per position); the others probe on.
            fa, fp = act[free], p[free]
            was_tomb = k[free] == TOMB
            self.keys[fp] = q[fa]
            won = self.keys[fp] == q[fa]
            wa, wp = fa[won], fp[won]
            self.tombs -= int(was_tomb[won].sum())
            self.vals[wp] = slots[wa]
            placed = np.zeros(q.shape[0], bool)
            placed[wa] = True
            act = act[~placed[act]]
            pos[act] = (pos[act] + 1) & m
        self.live += q.shape[0]

    def delete(self, q: np.ndarray) -> np.ndarray:
        """Remove the present keys among q; returns their slots (absent keys are skipped)."""
        pos = self._find(q)
        pos = pos[pos >= 0]
        slots = self.vals[pos].copy()
        self.keys[pos] = TOMB
        self.live -= pos.shape[0]
        self.tombs += pos.shape[0]
        return slots

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        live = self.keys >= 0
        return self.keys[live], self.vals[live]

    def _rebuild(self, extra: int) -> None:
        k, v = self.items()
        cap = self.keys.shape[0]
        while (k.shape[0] + extra) > 0.5 * cap:
            cap *= 2
        self.mask = np.uint64(cap - 1)
        self.keys = np.full(cap, EMPTY, np.int64)
        self.vals = np.full(cap, -1, np.int64)     # touched now: a fixed cost, not growth under load
        self.live = self.tombs = 0
        if k.shape[0]:
            self.insert(k, v)
