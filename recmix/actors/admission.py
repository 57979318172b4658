"""Admission of new ids (storage.md 3.1): always, after N sightings (counting filter), or with p.

A "sighting" is one pull that contains the id (duplicates within a pull count once: the client
deduplicates before routing). The counting filter is a count-min sketch (k hash rows folded into one
array of uint32 counters): it may over-count on collisions, never under-count, so an id is admitted no
later than its N-th sighting. Its state is saved in checkpoints and summed when re-sharding.
"""

from __future__ import annotations

import numpy as np

from recmix.platform.hashing import mix64, table_key
from recmix.platform.specs.embedding import AdmitAlways, AdmitOccurrence, AdmitProbability


class Admission:
    def __init__(self, cfg, seed: int, shard_id: int):
        self.cfg = cfg
        self.counters: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng([seed, shard_id])

    def _positions(self, table: str, ids: np.ndarray) -> np.ndarray:
        k, mask = self.cfg.hashes, np.uint64(self.cfg.filter_slots - 1)
        base = ids.astype(np.uint64) ^ table_key(table)
        with np.errstate(over="ignore"):
            return np.stack([(mix64(base + np.uint64(j) * np.uint64(0x9E3779B97F4A7C15)) & mask).astype(np.int64)
                             for j in range(k)])

    def admit(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Mask of the (unique, not yet stored) ids whose rows are created now."""
        cfg = self.cfg
        if isinstance(cfg, AdmitAlways) or ids.shape[0] == 0:
            return np.ones(ids.shape[0], bool)
        if isinstance(cfg, AdmitProbability):
            return self.rng.random(ids.shape[0]) < cfg.p
        if isinstance(cfg, AdmitOccurrence):
            cnt = self.counters.get(table)
            if cnt is None:
                cnt = self.counters[table] = np.zeros(cfg.filter_slots, np.uint32)
            pos = self._positions(table, ids)                  # [k, n]
            # Counters hit by several (id, hash) pairs of this batch get all of them (over-count only).
            flat = np.unique(pos.ravel())
            inc = np.bincount(np.searchsorted(flat, pos.ravel()), minlength=flat.shape[0]).astype(np.uint32)
            cnt[flat] = np.minimum(cnt[flat].astype(np.uint64) + inc, np.iinfo(np.uint32).max).astype(np.uint32)
            return cnt[pos].min(axis=0) >= cfg.threshold
        raise AssertionError(f"unhandled admission policy {cfg!r}")

    def state(self) -> dict[str, np.ndarray]:
        return {t: c.copy() for t, c in self.counters.items()}

    def merge(self, table: str, counters: np.ndarray) -> None:
        if not isinstance(self.cfg, AdmitOccurrence) or counters.shape[0] != self.cfg.filter_slots:
            return
        cur = self.counters.setdefault(table, np.zeros(self.cfg.filter_slots, np.uint32))
        self.counters[table] = np.minimum(cur.astype(np.uint64) + counters, np.iinfo(np.uint32).max).astype(np.uint32)
