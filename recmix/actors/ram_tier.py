"""The RAM tier (T1) of one table in one shard: preallocated slabs plus a vectorized id -> slot index.

Slabs are allocated once at the shard's RAM budget with np.zeros, so pages become resident only when
a slot is first used; the free list hands out low slots first to keep the touched range compact.
Flags: DIRTY = values/state changed since the row was last written to LMDB (the RAM row is then
authoritative, storage.md 2.5); SEEN = only sighting metadata changed (written on eviction only when
expiry needs it, so without expiry clean rows are never rewritten).
"""

from __future__ import annotations

import numpy as np

from recmix.actors.hashindex import HashIndex

DIRTY = np.uint8(1)
SEEN = np.uint8(2)


class RamTable:
    def __init__(self, cap: int, dim: int, s: int, dtype: np.dtype):
        self.cap, self.dim, self.s, self.dtype = cap, dim, s, dtype
        self.values = np.zeros((cap, dim), np.float32)
        self.state = np.zeros((cap, s), np.float32)
        self.pass_ = np.zeros(cap, np.int64)
        self.time = np.zeros(cap, np.float64)
        self.count = np.zeros(cap, np.int64)
        self.tick = np.zeros(cap, np.int64)
        self.flags = np.zeros(cap, np.uint8)
        self.ids = np.full(cap, -1, np.int64)
        self.free = np.arange(cap - 1, -1, -1, dtype=np.int64)      # stack: top is free[n_free - 1]
        self.n_free = cap
        self.index = HashIndex(cap)

    @property
    def rows(self) -> int:
        return self.cap - self.n_free

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return self.index.lookup(ids)

    def add(self, ids: np.ndarray, rows: np.ndarray, flags: np.uint8) -> np.ndarray:
        """Insert rows (structured, rows.row_dtype) for ids that are not resident; returns their slots."""
        n = ids.shape[0]
        if n > self.n_free:
            raise AssertionError(f"RAM tier overflow: {n} rows into {self.n_free} free slots")
        slots = self.free[self.n_free - n:self.n_free][::-1].copy()
        self.n_free -= n
        self.values[slots] = rows["v"]
        self.state[slots] = rows["s"]
        self.pass_[slots] = rows["pass"]
        self.time[slots] = rows["time"]
        self.count[slots] = rows["count"]
        self.flags[slots] = flags
        self.ids[slots] = ids
        self.index.insert(ids, slots)
        return slots

    def export(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty(slots.shape[0], self.dtype)
        out["v"] = self.values[slots]
        out["s"] = self.state[slots]
        out["pass"] = self.pass_[slots]
        out["time"] = self.time[slots]
        out["count"] = self.count[slots]
        return out

    def remove(self, slots: np.ndarray) -> None:
        self.index.delete(self.ids[slots])
        self.ids[slots] = -1
        self.flags[slots] = 0
        self.free[self.n_free:self.n_free + slots.shape[0]] = slots
        self.n_free += slots.shape[0]

    def used(self) -> np.ndarray:
        return np.flatnonzero(self.ids >= 0)

    def touch(self, slots: np.ndarray, tick: int, pass_id: int, now: float, count: bool) -> None:
        """Record a sighting; `count` only for pulls (LFU counts pulls, a push is not a new sighting)."""
        self.tick[slots] = tick
        self.pass_[slots] = pass_id
        self.time[slots] = now
        if count:
            self.count[slots] += 1
        self.flags[slots] |= SEEN
