"""One embedding shard: RAM tier over an LMDB tier, admission, eviction, expiry, row-wise optimizers.

`ShardCore` is plain Python (the Ray actor in `actor.py` wraps it). Every request carries all tables
of a batch for this shard: {table: ids} (pull) or {table: (ids, grads)} (push). Requests are validated
completely before anything changes, so bad input leaves the shard as it was.

Tier rules (storage.md 2.5): a DIRTY RAM row is authoritative, otherwise LMDB is; promotion copies;
demotion of a clean row only frees its slot; dirty rows reach LMDB on eviction, at pass end, on flush
(checkpoints) or, with `durability: write_through`, before a push is acknowledged.

Pushes (issue 14): a push names rows that the caller pulled as admitted, so it applies to every one of
them: a row that is missing was lost by a restart before it reached LMDB (created by a pull, never
updated) and is re-created from its deterministic initializer before the update. A push may carry a
request id; the shard records its progress (per table chunk, in the same LMDB transaction as the rows
with `write_through`), so a push retried after a crash applies each chunk exactly once.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np

from recmix.actors import optim
from recmix.actors.admission import Admission
from recmix.actors.lmdb_tier import LmdbTier
from recmix.actors.ram_tier import DIRTY, SEEN, RamTable
from recmix.actors.layout import PSLayout
from recmix.actors.rows import check_ids, check_rows, init_values, segment_sum
from recmix.platform.specs.embedding import Durability, EmbeddingConfig, Eviction, ExpiryOff, ExpiryPasses

STAT_KEYS = ("ram_hits", "lmdb_hits", "misses", "admitted", "rejected", "evicted", "written", "expired",
             "pulled", "pushed", "recreated")
REQUESTS_KEPT = 4096          # recent push request ids remembered in RAM
REQUEST_TTL_S = 3600.0        # ... and in LMDB (write_through), pruned at pass ends; retries take seconds


def _sorted_unique(ids: np.ndarray) -> bool:
    return ids.shape[0] < 2 or bool((ids[1:] > ids[:-1]).all())


class ShardCore:
    def __init__(self, cfg: EmbeddingConfig, layout: PSLayout, shard_id: int, root: str):
        assert 0 <= shard_id < layout.n_shards, (shard_id, layout.n_shards)
        self.cfg, self.layout, self.shard_id, self.n_shards = cfg, layout, shard_id, layout.n_shards
        self.dims, self.swidth = layout.dims, layout.state_widths
        self.inits = {t.name: t.initializer for t in layout.tables.values()}
        self.dtypes = {t.name: t.dtype for t in layout.tables.values()}
        self.ram = {t: RamTable(cfg.ram_rows, d, self.swidth[t], self.dtypes[t]) for t, d in self.dims.items()}
        self.durable = cfg.durability is Durability.write_through
        self.path = os.path.join(root, layout.shard_names[shard_id])
        self.lmdb = LmdbTier(self.path, self.dtypes, cfg.map_size, sync=self.durable)
        self.pass_id = self.lmdb.get_meta("pass", 0)
        self.admission = Admission(cfg.admission, cfg.seed, shard_id)
        self.tick = 0
        self.stats = {t: dict.fromkeys(STAT_KEYS, 0) for t in self.dims}
        self.flush_seen = not isinstance(cfg.expiry, ExpiryOff)   # keep LMDB sighting meta current for expiry
        self.requests: OrderedDict[str, tuple[int, int]] = OrderedDict()   # request id -> (chunks done, rows)
        self.replayed = 0         # pushes answered from the request record (retries of applied pushes)

    # ---- validation --------------------------------------------------------------------------
    def _table(self, table) -> str:
        return self.layout.check(table)

    def _chunks(self, n: int) -> list[slice]:
        """Requests are served in chunks of at most half the RAM budget: a chunk's rows stay resident
        while it is served, and eviction can always make room (rows of earlier chunks may go)."""
        c = max(1, self.cfg.ram_rows // 2)
        return [slice(lo, min(n, lo + c)) for lo in range(0, n, c)] or [slice(0, 0)]

    # ---- residency ---------------------------------------------------------------------------
    def _rows_total(self) -> int:
        return sum(r.rows for r in self.ram.values())

    def _make_room(self, n_new: int) -> None:
        """Evict (LRU or LFU) so that n_new rows fit; rows touched by the current request are kept."""
        cap = self.cfg.ram_rows
        have = self._rows_total()
        if have + n_new <= cap:
            return
        n_evict = max(have + n_new - cap, have + n_new - int(self.cfg.evict_to * cap))
        cands = []
        for ti, (t, ram) in enumerate(self.ram.items()):
            used = ram.used()
            used = used[ram.tick[used] != self.tick]
            primary = ram.tick[used] if self.cfg.eviction is Eviction.lru else ram.count[used]
            cands.append((np.full(used.shape[0], ti), used, primary, ram.tick[used]))
        tix, slots, primary, tick = (np.concatenate(c) for c in zip(*cands))
        n_evict = min(n_evict, slots.shape[0])
        assert have + n_new - n_evict <= cap, "request larger than the RAM budget passed validation"
        if n_evict < slots.shape[0]:
            key = primary.astype(np.float64) * 2.0 ** 32 + tick if self.cfg.eviction is Eviction.lfu else primary
            pick = np.argpartition(key, n_evict - 1)[:n_evict]
        else:
            pick = np.arange(slots.shape[0])
        for ti, t in enumerate(self.ram):
            sel = slots[pick[tix[pick] == ti]]
            if sel.shape[0]:
                self._demote(t, sel)

    def _demote(self, table: str, slots: np.ndarray) -> None:
        ram = self.ram[table]
        mask = DIRTY | SEEN if self.flush_seen else DIRTY
        w = slots[(ram.flags[slots] & mask) != 0]
        if w.shape[0]:
            self.lmdb.put(table, ram.ids[w], ram.export(w))
            self.stats[table]["written"] += int(w.shape[0])
        ram.remove(slots)
        self.stats[table]["evicted"] += int(slots.shape[0])

    def _resolve(self, table: str, u: np.ndarray, force: bool, now: float, count: bool) -> np.ndarray:
        """Slots of sorted unique ids u (-1 = not stored and not admitted); promotes and creates rows.
        force: create every missing row without asking admission (pushes: the caller saw it admitted)."""
        ram, st = self.ram[table], self.stats[table]
        slots = ram.lookup(u)
        hit = slots >= 0
        ram.touch(slots[hit], self.tick, self.pass_id, now, count)
        st["ram_hits"] += int(hit.sum())
        miss = np.flatnonzero(~hit)
        if miss.shape[0] == 0:
            return slots
        mids = u[miss]
        found, frows = self.lmdb.get(table, mids)
        st["lmdb_hits"] += int(found.shape[0] and found.sum())
        absent = np.flatnonzero(~found)
        st["misses"] += int(absent.shape[0])
        if force:
            new = absent
            st["recreated"] += int(new.shape[0])
        else:
            new = absent[self.admission.admit(table, mids[absent])]
            st["admitted"] += int(new.shape[0])
            st["rejected"] += int(absent.shape[0] - new.shape[0])
        self._make_room(int(found.sum()) + new.shape[0])
        if frows.shape[0]:
            slots[miss[found]] = ram.add(mids[found], frows, np.uint8(0))
        if new.shape[0]:
            nid = mids[new]
            rows = np.zeros(nid.shape[0], self.dtypes[table])
            rows["v"] = init_values(self.inits[table], self.cfg.seed, table, nid, self.dims[table])
            slots[miss[new]] = ram.add(nid, rows, DIRTY)
        fresh = slots[miss][slots[miss] >= 0]
        ram.touch(fresh, self.tick, self.pass_id, now, count)
        return slots

    # ---- API ---------------------------------------------------------------------------------
    def pull(self, req: dict, with_state: bool = False, out: dict | None = None) -> dict:
        """{table: ids} -> {table: (values [n, E], admitted [n], state [n, S] or None)} in ids order.
        `out` ({table: float32 [n, E]}) receives the values instead of new arrays (shared buffers)."""
        prepared = {}
        for table, ids in req.items():
            ids = check_ids(self._table(table), ids)
            if _sorted_unique(ids):
                prepared[table] = (ids, None)
            else:
                prepared[table] = np.unique(ids, return_inverse=True)
        now = time.time()
        res = {}
        for table, (u, inv) in prepared.items():
            ram = self.ram[table]
            parts = self._chunks(u.shape[0])
            if len(parts) == 1:
                self.tick += 1
                slots = self._resolve(table, u, force=False, now=now, count=True)
                ok = slots >= 0
                if ok.all():
                    if out is not None and table in out and inv is None:
                        vals = np.take(ram.values, slots, axis=0, out=out[table])
                    else:
                        vals = ram.values[slots]
                    state = ram.state[slots] if with_state else None
                else:
                    vals, state = self._gather(table, slots, ok, with_state)
            else:
                vals = np.empty((u.shape[0], self.dims[table]), np.float32)
                state = np.empty((u.shape[0], self.swidth[table]), np.float32) if with_state else None
                ok = np.empty(u.shape[0], bool)
                for sl in parts:
                    self.tick += 1
                    slots = self._resolve(table, u[sl], force=False, now=now, count=True)
                    ok[sl] = slots >= 0
                    v, st = self._gather(table, slots, ok[sl], with_state)
                    vals[sl] = v
                    if with_state:
                        state[sl] = st
            if inv is not None:
                vals, ok = vals[inv], ok[inv]
                state = state[inv] if state is not None else None
            if out is not None and table in out and vals is not out[table]:
                out[table][...] = vals
                vals = out[table]
            self.stats[table]["pulled"] += int(u.shape[0])
            res[table] = (vals, ok, state)
        return res

    def _gather(self, table: str, slots: np.ndarray, ok: np.ndarray, with_state: bool):
        """Values (and state) of slots; zeros (the default row) where ok is False."""
        ram = self.ram[table]
        vals = np.zeros((slots.shape[0], self.dims[table]), np.float32)
        vals[ok] = ram.values[slots[ok]]
        state = None
        if with_state:
            state = np.zeros((slots.shape[0], self.swidth[table]), np.float32)
            state[ok] = ram.state[slots[ok]]
        return vals, state

    def push(self, req: dict, request_id: str | None = None) -> int:
        """{table: (ids, grads [n, E])}: sum duplicates, run the row-wise optimizer on every row (missing
        rows re-created first). Returns the number of unique rows updated; with a `request_id` seen
        before, only the chunks not yet applied are applied (retries after a crash)."""
        checked = {}
        for table, (ids, grads) in req.items():
            ids = check_ids(self._table(table), ids)
            checked[table] = segment_sum(ids, check_rows(table, "gradients", grads, ids.shape[0], self.dims[table]))
        return self._update(checked, lambda w, s, g: optim.apply(self.cfg.optimizer, w, s, g), request_id)

    def push_deltas(self, req: dict, request_id: str | None = None) -> int:
        """{table: (ids, dvalues [n, E], dstate [n, S])}: add working-set deltas (pass mode, storage.md 2.2);
        rows, counts and request ids as in `push`."""
        checked = {}
        for table, (ids, dv, ds) in req.items():
            ids = check_ids(self._table(table), ids)
            dv = check_rows(table, "value deltas", dv, ids.shape[0], self.dims[table])
            ds = check_rows(table, "state deltas", ds, ids.shape[0], self.swidth[table])
            checked[table] = segment_sum(ids, np.concatenate([dv, ds], axis=1))
        return self._update(checked, lambda w, s, d: (w + d[:, :w.shape[1]], s + d[:, w.shape[1]:]), request_id)

    def _progress(self, request_id: str | None) -> tuple[int, int]:
        """(chunks applied, rows applied) of a push request seen before; (0, 0) for a new one."""
        if request_id is None:
            return 0, 0
        got = self.requests.get(request_id)
        if got is None and self.durable:
            raw = self.lmdb.get_request(request_id.encode())
            if raw is not None:
                done, rows, _ = raw.decode().split(",")
                got = (int(done), int(rows))
        return got or (0, 0)

    def _record(self, request_id: str, done: int, rows: int) -> None:
        self.requests[request_id] = (done, rows)
        self.requests.move_to_end(request_id)
        while len(self.requests) > REQUESTS_KEPT:
            self.requests.popitem(last=False)

    def _update(self, checked: dict, step, request_id: str | None) -> int:
        now = time.time()
        units = [(t, sl) for t, (u, _) in checked.items() for sl in self._chunks(u.shape[0])]
        done, applied = self._progress(request_id)
        if done:
            self.replayed += 1
        for k, (table, sl) in enumerate(units):
            if k < done:
                continue                                   # applied before a crash (retried request)
            u_all, x_all = checked[table]
            ram = self.ram[table]
            self.tick += 1
            s = self._resolve(table, u_all[sl], force=True, now=now, count=False)
            assert (s >= 0).all(), "forced resolve left a row without a slot"
            w, st = step(ram.values[s], ram.state[s], x_all[sl])
            ram.values[s] = w
            ram.state[s] = st
            ram.flags[s] |= DIRTY
            applied += int(s.shape[0])
            self.stats[table]["pushed"] += int(s.shape[0])
            mark = None
            if request_id is not None:
                self._record(request_id, k + 1, applied)
                mark = (request_id.encode(), f"{k + 1},{applied},{now}".encode())
            if self.durable:
                self._write(table, s, mark)                # rows and progress in one transaction
        return applied

    def _write(self, table: str, slots: np.ndarray, mark: tuple[bytes, bytes] | None = None) -> None:
        ram = self.ram[table]
        self.lmdb.put(table, ram.ids[slots], ram.export(slots), mark)
        ram.flags[slots] = 0
        self.stats[table]["written"] += int(slots.shape[0])

    def flush(self) -> int:
        """Write every dirty RAM row (and, with expiry on, rows with new sightings) to LMDB."""
        mask = DIRTY | SEEN if self.flush_seen else DIRTY
        n = 0
        for table, ram in self.ram.items():
            used = ram.used()
            w = used[(ram.flags[used] & mask) != 0]
            if w.shape[0]:
                self._write(table, w)
                n += int(w.shape[0])
        return n

    def end_pass(self) -> dict:
        """Pass boundary: advance the pass id, flush dirty rows, run expiry."""
        self.pass_id += 1
        self.flush()
        self.lmdb.put_meta("pass", self.pass_id)
        if self.durable:
            old = time.time() - REQUEST_TTL_S
            self.lmdb.prune_requests(lambda v: float(v.split(b",")[2]) >= old)
        return {"pass": self.pass_id, "expired": self.expire()}

    def set_admission(self, table: str, counters: np.ndarray) -> None:
        """Replace a table's occurrence counters (exact snapshot restore onto the same shard count)."""
        self._table(table)
        self.admission.counters[table] = np.array(counters, np.uint32)

    def clear(self, pass_id: int) -> None:
        """Remove every row (both tiers) and the admission counters, and set the pass counter: the
        state before an exact snapshot restore."""
        for table, ram in self.ram.items():
            ram.remove(ram.used())
            self.lmdb.clear(table)
        self.admission = Admission(self.cfg.admission, self.cfg.seed, self.shard_id)
        self.pass_id = int(pass_id)
        self.lmdb.put_meta("pass", self.pass_id)

    def expire(self) -> int:
        cfg = self.cfg.expiry
        if isinstance(cfg, ExpiryOff):
            return 0
        by_pass = isinstance(cfg, ExpiryPasses)
        limit = self.pass_id - cfg.after if by_pass else time.time() - cfg.after
        total = 0
        for table, ram in self.ram.items():
            used = ram.used()
            last = ram.pass_[used] if by_pass else ram.time[used]
            gone = used[last < limit]
            dead = [ram.ids[gone]]
            ram.remove(gone)
            for ids, rows in self.lmdb.scan(table):
                old = ids[(rows["pass"] if by_pass else rows["time"]) < limit]
                dead.append(old[ram.lookup(old) < 0])      # a resident row is authoritative
            dead_ids = np.concatenate(dead)
            self.lmdb.delete(table, dead_ids)
            self.stats[table]["expired"] += int(np.unique(dead_ids).shape[0])
            total += int(np.unique(dead_ids).shape[0])
        return total

    def drop_ram(self) -> None:
        """Flush, then empty the RAM tier (benchmarks of the cold path; restores)."""
        self.flush()
        for ram in self.ram.values():
            ram.remove(ram.used())

    def dump(self, table: str):
        """(ids, rows) of every stored row of a table, after a flush (checkpoints)."""
        self._table(table)
        self.flush()
        parts = list(self.lmdb.scan(table))
        if not parts:
            return np.empty(0, np.int64), np.empty(0, self.dtypes[table])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def load(self, table: str, ids: np.ndarray, rows: np.ndarray) -> int:
        """Store rows (checkpoint restore): they replace any resident copy."""
        ids = check_ids(self._table(table), ids)
        if rows.dtype != self.dtypes[table] or rows.shape != ids.shape:
            raise ValueError(f"table '{table}': rows must be {ids.shape[0]} records of {self.dtypes[table]}, "
                             f"got {rows.shape} of {rows.dtype}")
        ram = self.ram[table]
        slots = ram.lookup(ids)
        ram.remove(slots[slots >= 0])
        self.lmdb.put(table, ids, rows)
        return int(ids.shape[0])

    def is_empty(self) -> bool:
        """Whether LMDB holds no row (a first start, or a restart on a node without the files)."""
        return all(self.lmdb.count(t) == 0 for t in self.dims)

    def io_stats(self) -> dict:
        return {"lmdb_writes": self.lmdb.writes, "lmdb_write_txns": self.lmdb.write_txns}

    def release(self) -> None:
        """The group is being destroyed: the LMDB files stay (they are the durable tier)."""

    def counts(self) -> dict:
        return {t: {"ram": self.ram[t].rows, "lmdb": self.lmdb.count(t), **self.stats[t]} for t in self.dims}
