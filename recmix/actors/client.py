"""Client/router: per-batch dedup, routing by `shard_of`, one concurrent call per shard, reassembly.

Routing is `recmix.platform.hashing.shard_of(table, id, S)` (splitmix64, documented there), so rows can
be re-sharded from a checkpoint. Per table the client keeps the sorted unique ids (np.unique), sends
each shard its slice (already sorted and unique, so the shard skips its own dedup), and scatters the
answers back; numpy arrays travel through the object store without per-row copies.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import ray

from recmix.actors import shm
from recmix.actors.rows import segment_sum
from recmix.platform.hashing import shard_of


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
    def __init__(self, shards: list, dims: dict[str, int], state_widths: dict[str, int], same_node_buffers: bool = True):
        self.shards = list(shards)
        self.dims = dict(dims)
        self.swidth = dict(state_widths)
        # One /dev/shm transfer buffer per shard for pull answers (shm.py); None = object store only.
        tag = uuid.uuid4().hex[:8]
        self.buffers = [shm.Buffer(f"{tag}-{i}") if same_node_buffers and shm.available() else None
                        for i in range(len(self.shards))]

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def _table(self, table: str) -> str:
        if table not in self.dims:
            raise ValueError(f"unknown embedding table '{table}' (known: {', '.join(self.dims)})")
        return table

    def _split(self, table: str, u: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions in u) for every shard that owns some of the sorted unique ids u."""
        if self.n_shards == 1:
            return [(0, slice(None))]
        sh = shard_of(table, u, self.n_shards)
        order = np.argsort(sh, kind="stable")          # stable: each shard's slice stays sorted
        bounds = np.searchsorted(sh[order], np.arange(self.n_shards + 1))
        return [(s, order[bounds[s]:bounds[s + 1]]) for s in range(self.n_shards) if bounds[s + 1] > bounds[s]]

    def _call(self, method: str, per_shard: dict[int, dict], *args) -> dict[int, object]:
        refs = {s: getattr(self.shards[s], method).remote(req, *args) for s, req in per_shard.items()}
        got = ray.get(list(refs.values()))
        return dict(zip(refs.keys(), got))

    def _pull_calls(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
        """One concurrent call per shard; through the shard's shared buffer where there is one."""
        refs, plain = {}, {}
        for s, req in per_shard.items():
            buf = self.buffers[s]
            if buf is None:
                plain[s] = req
                continue
            spec, off = {}, 0
            for t, ids in req.items():
                n = ids.shape[0]
                ioff, voff = off, shm.align(off + 8 * n)
                off = shm.align(voff + 4 * n * self.dims[t])
                spec[t] = (ioff, n, voff)
            buf.ensure(off)
            for t, (ioff, n, _) in spec.items():
                buf.view(np.int64, ioff, (n,))[:] = req[t]
            refs[s] = (self.shards[s].pull_shm.remote(buf.path, spec, with_state), spec)
        plain_refs = {s: self.shards[s].pull.remote(req, with_state) for s, req in plain.items()}
        out = {}
        for s, (ref, spec) in refs.items():
            got = ray.get(ref)
            if got is None:                                   # shard on another node: no shared buffer
                self.buffers[s] = None
                out[s] = ray.get(self.shards[s].pull.remote(per_shard[s], with_state))
                continue
            buf = self.buffers[s]
            out[s] = {t: (buf.view(np.float32, spec[t][2], (spec[t][1], self.dims[t])), ok, st)
                      for t, (_, ok, st) in got.items()}
        out.update(zip(plain_refs.keys(), ray.get(list(plain_refs.values()))))
        return out

    # ---- pulls ---------------------------------------------------------------------------------
    def pull_unique(self, batch: dict[str, np.ndarray], with_state: bool = False, copy: bool = True) -> dict[str, Pulled]:
        """One call per shard for all tables of the batch; results per table over its unique ids.
        copy=False may return values that view the transfer buffer: valid until the next pull."""
        plan, per_shard = {}, {}
        for table, ids in batch.items():
            flat = check_batch_ids(self._table(table), ids)
            u, inv = np.unique(flat, return_inverse=True)
            parts = self._split(table, u)
            plan[table] = (u, inv, parts)
            for s, pos in parts:
                per_shard.setdefault(s, {})[table] = u[pos] if self.n_shards > 1 else u
        res = self._pull_calls(per_shard, with_state) if per_shard else {}
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
        per_shard = {}
        for table, (ids, *arrays) in batch.items():
            flat = check_batch_ids(self._table(table), ids)
            widths = (self.dims[table], self.swidth[table])[:len(arrays)]
            for a, w in zip(arrays, widths):
                if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape != (flat.shape[0], w):
                    raise ValueError(f"table '{table}': {method} needs arrays of shape ({flat.shape[0]}, {w}), got "
                                     f"{getattr(a, 'shape', type(a).__name__)}")
            u, x = segment_sum(flat, np.concatenate(arrays, axis=1) if len(arrays) > 1 else arrays[0])
            cuts = np.cumsum(widths)[:-1]
            for s, pos in self._split(table, u):
                per_shard.setdefault(s, {})[table] = (u[pos], *np.split(x[pos], cuts, axis=1))
        refs = [getattr(self.shards[s], method).remote(req) for s, req in per_shard.items()]
        return sum(ray.get(refs)) if wait else refs

    def push(self, batch: dict[str, tuple[np.ndarray, np.ndarray]], wait: bool = True):
        """{table: (ids [N], grads [N, E])}: duplicates summed here and on the shard, optimizer on the shard.
        Returns the number of rows updated (wait=True) or the object refs to wait on."""
        return self._push("push", batch, wait)

    def push_deltas(self, batch: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], wait: bool = True):
        """{table: (ids, dvalues [N, E], dstate [N, S])}: working-set deltas at pass end."""
        return self._push("push_deltas", batch, wait)

    # ---- control -------------------------------------------------------------------------------
    def end_pass(self) -> list[dict]:
        return ray.get([s.end_pass.remote() for s in self.shards])

    def flush(self) -> int:
        return sum(ray.get([s.flush.remote() for s in self.shards]))

    def counts(self) -> list[dict]:
        return ray.get([s.counts.remote() for s in self.shards])

    def close(self) -> None:
        """Remove the shared transfer buffers (the shards are not touched)."""
        for b in self.buffers:
            if b is not None:
                b.close()
