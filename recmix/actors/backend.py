"""How `PSClient` reaches its shards: the `ShardBackend` seam.

The client does dedup, routing and scatter; a backend only carries per-shard requests that are already
routed ({shard: {table: ...}}) and returns per-shard answers. `RayShards` sends one concurrent call per
shard to the `EmbeddingShard` actors (pull answers through a /dev/shm buffer per shard when the shard
is on this node); `InProcessShards` calls `ShardCore`s directly, so routing, dedup and scatter are tested
without Ray.
"""

from __future__ import annotations

import uuid
from typing import Protocol

import numpy as np

from recmix.actors import shm
from recmix.actors.layout import PSLayout


class ShardBackend(Protocol):
    shards: list

    def pull(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
        """{shard: {table: sorted unique ids}} -> {shard: {table: (values [n, E], admitted [n], state)}};
        values may view a transfer buffer that the next pull overwrites."""

    def push(self, method: str, per_shard: dict[int, dict]) -> list:
        """`push` or `push_deltas` per shard, concurrently; returns pending results for `wait`."""

    def wait(self, pending: list) -> int:
        """Wait for pending pushes (their errors surface here); returns the rows they updated."""

    def each(self, method: str) -> list:
        """Call a no-argument shard method on every shard (end_pass, flush, counts), in shard order."""

    def close(self) -> None:
        """Release client-side resources (transfer buffers); the shards keep running."""

    def stop(self) -> None:
        """Stop the shards (actors are killed; their LMDB files stay)."""


class InProcessShards:
    """`ShardCore`s in this process: the same answers as the actors, no Ray."""

    def __init__(self, cores: list):
        self.shards = list(cores)

    def pull(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
        return {s: self.shards[s].pull(req, with_state) for s, req in per_shard.items()}

    def push(self, method: str, per_shard: dict[int, dict]) -> list:
        return [getattr(self.shards[s], method)(req) for s, req in per_shard.items()]

    def wait(self, pending: list) -> int:
        return sum(pending)

    def each(self, method: str) -> list:
        return [getattr(c, method)() for c in self.shards]

    def close(self) -> None:
        pass

    def stop(self) -> None:
        pass


class RayShards:
    """`EmbeddingShard` actor handles; one concurrent call per shard for every request."""

    def __init__(self, handles: list, layout: PSLayout, same_node_buffers: bool = True):
        assert len(handles) == layout.n_shards, (len(handles), layout.n_shards)
        self.shards = list(handles)
        self.dims = layout.dims
        # One /dev/shm transfer buffer per shard for pull answers (shm.py); None = object store only.
        tag = uuid.uuid4().hex[:8]
        self.buffers = [shm.Buffer(f"{tag}-{i}") if same_node_buffers and shm.available() else None
                        for i in range(len(self.shards))]

    def pull(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
        import ray

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

    def push(self, method: str, per_shard: dict[int, dict]) -> list:
        return [getattr(self.shards[s], method).remote(req) for s, req in per_shard.items()]

    def wait(self, pending: list) -> int:
        import ray

        return sum(ray.get(pending)) if pending else 0

    def each(self, method: str) -> list:
        import ray

        return ray.get([getattr(s, method).remote() for s in self.shards])

    def close(self) -> None:
        for b in self.buffers:
            if b is not None:
                b.close()
        self.buffers = [None] * len(self.shards)

    def stop(self) -> None:
        import ray

        for s in self.shards:
            ray.kill(s)
