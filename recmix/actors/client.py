"""Client/router: per-batch dedup, routing by `shard_of`, one concurrent call per shard, reassembly.

Routing is `recmix.platform.hashing.shard_of(table, id, S)` (splitmix64, documented there), so rows can
be re-sharded from a checkpoint; a range layout (`PSLayout.ranges`, the LMN memory) routes id ranges.
Per table the client keeps the sorted unique ids (np.unique), sends
each shard its slice (already sorted and unique, so the shard skips its own dedup), and scatters the
answers back. The calls go through a `ShardBackend` (backend.py): Ray actors, or `ShardCore`s in
this process for tests.

Pushes apply to every row they name or raise: each shard's part carries a request id and the number
of unique rows it must update; `wait` checks the counts the shards return (a shard re-creates a row
that a restart lost, shard.py) and raises `PushError` when a shard did not apply its part.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from recmix.actors.backend import PendingPush, PushError, ShardBackend
from recmix.actors.layout import PSLayout
from recmix.actors.rows import segment_sum


@dataclass
class Pulled:
    ids: np.ndarray         # [U] sorted unique ids
    inverse: np.ndarray     # [N] position of each batch id in `ids`
    values: np.ndarray      # [U, E] (with copy=False possibly a view of the transfer buffer)
    admitted: np.ndarray    # [U] bool: False = default (zero) row that takes no update
    state: np.ndarray | None  # [U, S] when asked for

    def rows(self) -> np.ndarray:
        """Values in batch order [N, E]."""
        return self.values[self.inverse]


def check_batch_ids(table: str, ids) -> np.ndarray:
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64:
        raise ValueError(f"table '{table}': ids must be a numpy int64 array, got {getattr(ids, 'dtype', type(ids).__name__)}")
    flat = ids.reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError(f"table '{table}': ids must be non-negative, got min {int(flat.min())}")
    return flat


class PSClient:
    def __init__(self, backend: ShardBackend, layout: PSLayout):
        self.backend, self.layout = backend, layout
        self.dims, self.swidth = layout.dims, layout.state_widths

    @property
    def shards(self) -> list:
        return self.backend.shards

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards

    def _split(self, table: str, u: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions in u) for every shard that owns some of the sorted unique ids u."""
        if self.layout.ranges is not None:
            self.layout.route(table, u[[0, -1]] if u.size else u)    # u is sorted: its ends bound the range check
            cut = np.searchsorted(u, self.layout.bounds(table))
            return [(s, slice(cut[s], cut[s + 1])) for s in range(self.n_shards) if cut[s + 1] > cut[s]]
        if self.n_shards == 1:
            return [(0, slice(None))]
        sh = self.layout.route(table, u)
        order = np.argsort(sh, kind="stable")          # stable: each shard's slice stays sorted
        bounds = np.searchsorted(sh[order], np.arange(self.n_shards + 1))
        return [(s, order[bounds[s]:bounds[s + 1]]) for s in range(self.n_shards) if bounds[s + 1] > bounds[s]]

    # ---- pulls ---------------------------------------------------------------------------------
    def pull_unique(self, batch: dict[str, np.ndarray], with_state: bool = False, copy: bool = True) -> dict[str, Pulled]:
        """One call per shard for all tables of the batch; results per table over its unique ids.
        copy=False may return values that view the transfer buffer: valid until the next pull."""
        plan, per_shard = {}, {}
        for table, ids in batch.items():
            flat = check_batch_ids(self.layout.check(table), ids)
            u, inv = np.unique(flat, return_inverse=True)
            parts = self._split(table, u)
            plan[table] = (u, inv, parts)
            for s, pos in parts:
                per_shard.setdefault(s, {})[table] = u[pos] if self.n_shards > 1 else u
        res = self.backend.pull(per_shard, with_state) if per_shard else {}
        out = {}
        for table, (u, inv, parts) in plan.items():
            e, sw = self.dims[table], self.swidth[table]
            if self.n_shards == 1 and parts:
                vals, ok, st = res[0][table]
                if copy:
                    vals = np.array(vals)
            else:
                vals = np.empty((u.shape[0], e), np.float32)
                ok = np.empty(u.shape[0], bool)
                st = np.empty((u.shape[0], sw), np.float32) if with_state else None
                for s, pos in parts:
                    v, a, x = res[s][table]
                    vals[pos], ok[pos] = v, a
                    if with_state:
                        st[pos] = x
            out[table] = Pulled(u, inv, vals, ok, st)
        return out

    def pull(self, batch: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """{table: ids of any shape (...)} -> {table: rows (..., E)} in batch order; `out` may supply
        preallocated float32 (..., E) arrays to fill (reused buffers avoid first-touch page faults)."""
        got = self.pull_unique(batch, copy=False)
        res = {}
        for t, p in got.items():
            shape = (*np.shape(batch[t]), self.dims[t])
            o = (out or {}).get(t)
            if o is None:
                res[t] = p.rows().reshape(shape)
            elif o.shape != shape or o.dtype != np.float32:
                raise ValueError(f"table '{t}': out must be float32 of shape {shape}, got {o.dtype} {o.shape}")
            else:
                np.take(p.values, p.inverse.reshape(-1), axis=0, out=o.reshape(-1, self.dims[t]))
                res[t] = o
        return res

    # ---- pushes --------------------------------------------------------------------------------
    def _push(self, method: str, batch: dict, wait: bool):
        per_shard: dict[int, dict] = {}
        for table, (ids, *arrays) in batch.items():
            flat = check_batch_ids(self.layout.check(table), ids)
            widths = (self.dims[table], self.swidth[table])[:len(arrays)]
            for a, w in zip(arrays, widths):
                if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape != (flat.shape[0], w):
                    raise ValueError(f"table '{table}': {method} needs arrays of shape ({flat.shape[0]}, {w}), got "
                                     f"{getattr(a, 'shape', type(a).__name__)}")
            u, x = segment_sum(flat, np.concatenate(arrays, axis=1) if len(arrays) > 1 else arrays[0])
            cuts = np.cumsum(widths)[:-1]
            for s, pos in self._split(table, u):
                per_shard.setdefault(s, {})[table] = (u[pos], *np.split(x[pos], cuts, axis=1))
        rid = uuid.uuid4().hex
        pending = self.backend.push([
            PendingPush(s, method, req, f"{rid}-{s}", sum(v[0].shape[0] for v in req.values()))
            for s, req in per_shard.items()])
        return self.wait(pending) if wait else pending

    def push(self, batch: dict[str, tuple[np.ndarray, np.ndarray]], wait: bool = True):
        """{table: (ids [N], grads [N, E])}: duplicates summed here and on the shard, optimizer on the shard.
        Every id must be one a pull returned as admitted: the push updates each of them (re-creating a
        row that a shard restart lost). Returns the number of unique rows updated (wait=True) or the
        pending parts to pass to `wait`."""
        return self._push("push", batch, wait)

    def push_deltas(self, batch: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], wait: bool = True):
        """{table: (ids, dvalues [N, E], dstate [N, S])}: working-set deltas at pass end (rows as in `push`)."""
        return self._push("push_deltas", batch, wait)

    def wait(self, pending: list[PendingPush]) -> int:
        """Wait for pushes sent with wait=False (retrying shards that restart); returns the rows they
        updated. Raises `PushError` when a shard did not apply its part: its `pending` may be passed
        here again (same request ids: applied once)."""
        if not pending:
            return 0
        counts = self.backend.wait(pending)
        short = [(p, c) for p, c in zip(pending, counts) if c != p.expect]
        if short:
            raise PushError("push not applied to every row: " + ", ".join(
                f"shard {p.shard} updated {c} of {p.expect}" for p, c in short), [p for p, _ in short])
        return sum(counts)

    # ---- control -------------------------------------------------------------------------------
    def end_pass(self, wait: bool = True):
        """Every shard advances its pass counter, flushes and runs expiry (after the requests this client
        sent before). Returns the shards' answers, or with wait=False a handle for `wait_end_pass`."""
        return self.backend.each("end_pass") if wait else self.backend.submit("end_pass")

    def wait_end_pass(self, submitted: list) -> list[dict]:
        return self.backend.gather(submitted)

    def flush(self) -> int:
        return sum(self.backend.each("flush"))

    def counts(self) -> list[dict]:
        return self.backend.each("counts")

    def clear(self, pass_id: int = 0) -> None:
        """Remove every row of every shard (both tiers) and the admission counters; set the pass
        counter. Only while no worker pushes (exact snapshot restores, `snapshot.py`)."""
        self.backend.each("clear", pass_id)

    def close(self) -> None:
        """Release the client's transfer buffers (the shards are not touched)."""
        self.backend.close()
