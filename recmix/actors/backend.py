"""How `PSClient` reaches its shards: the `ShardBackend` seam.

The client does dedup, routing and scatter; a backend only carries per-shard requests that are already
routed ({shard: {table: ...}}) and returns per-shard answers. `RayShards` sends one concurrent call per
shard to the `EmbeddingShard` actors (pull answers through a /dev/shm buffer per shard when the shard
is on this node); `InProcessShards` calls `ShardCore`s directly, so routing, dedup and scatter are tested
without Ray.

Pushes carry a request id (`PendingPush.request_id`). `RayShards.wait` re-sends a push whose shard
failed or was restarting (`RayActorError`, `ActorUnavailableError`) with the same id, a bounded number
of times; the shard applies each request once (shard.py), so a retry never doubles an update.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from recmix.actors import shm
from recmix.actors.layout import PSLayout
from recmix.platform.errors import RecmixError

PUSH_ATTEMPTS = 30          # sends of one push request before PushError (restarts take 0.2-1 s idle, ray.md 12,
                            # seconds on a loaded box; back-off 0.1 s doubling to 1 s)
PUSH_DEADLINE_S = 60.0      # ... and at most this long after the first failure


@dataclass
class PendingPush:
    """One shard's part of a push: what was sent, what it must update, and its in-flight result."""

    shard: int
    method: str             # push or push_deltas
    req: dict
    request_id: str
    expect: int             # unique rows the shard must report as updated
    result: Any = None      # Ray ObjectRef, or the count (in process)


class PushError(RecmixError):
    """A push was not applied on every shard. `pending` holds the parts not known to be applied
    (their shards failed past the retries); `client.wait(err.pending)` re-sends them with the same
    request ids, which the shards apply once. The other shards' parts are applied."""

    def __init__(self, msg: str, pending: list[PendingPush]):
        super().__init__(msg)
        self.pending = pending


class ShardBackend(Protocol):
    shards: list

    def pull(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
        """{shard: {table: sorted unique ids}} -> {shard: {table: (values [n, E], admitted [n], state)}};
        values may view a transfer buffer that the next pull overwrites."""

    def push(self, pending: list[PendingPush]) -> list[PendingPush]:
        """Send each shard's part (`push` or `push_deltas` with its request id), concurrently."""

    def wait(self, pending: list[PendingPush]) -> list[int]:
        """Rows each part updated, in order; a part whose shard keeps failing raises `PushError`."""

    def each(self, method: str, *args) -> list:
        """Call a shard method on every shard (end_pass, flush, counts, clear), in shard order."""

    def call(self, shard: int, method: str, *args):
        """Call a shard method on one shard and return its answer."""

    def submit(self, method: str, *args) -> list:
        """Like `each`, without waiting: the answers come from `gather`. On each shard it runs after
        every request this client sent it before (Ray keeps one caller's actor calls in order)."""

    def gather(self, submitted: list) -> list:
        """The answers of a `submit`."""

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

    def push(self, pending: list[PendingPush]) -> list[PendingPush]:
        for p in pending:
            p.result = getattr(self.shards[p.shard], p.method)(p.req, p.request_id)
        return pending

    def wait(self, pending: list[PendingPush]) -> list[int]:
        return [p.result for p in pending]

    def each(self, method: str, *args) -> list:
        return [getattr(c, method)(*args) for c in self.shards]

    def call(self, shard: int, method: str, *args):
        return getattr(self.shards[shard], method)(*args)

    def submit(self, method: str, *args) -> list:
        return self.each(method, *args)

    def gather(self, submitted: list) -> list:
        return submitted

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
        self.pull_lock = threading.Lock()      # one pull at a time per buffer (pass prefetch thread)

    def pull(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
        with self.pull_lock:
            return self._pull(per_shard, with_state)

    def _pull(self, per_shard: dict[int, dict], with_state: bool) -> dict[int, dict]:
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

    def _send(self, p: PendingPush) -> None:
        p.result = getattr(self.shards[p.shard], p.method).remote(p.req, p.request_id)

    def push(self, pending: list[PendingPush]) -> list[PendingPush]:
        for p in pending:
            self._send(p)
        return pending

    def wait(self, pending: list[PendingPush]) -> list[int]:
        import ray
        from ray.exceptions import RayActorError

        counts: list = [None] * len(pending)
        todo, attempt, deadline = list(range(len(pending))), 1, None
        while True:
            failed = {}
            for i in todo:
                try:
                    counts[i] = ray.get(pending[i].result)
                except RayActorError as e:   # died, or restarting (ActorUnavailableError): maybe not applied
                    failed[i] = e
            if not failed:
                return counts
            deadline = deadline or time.monotonic() + PUSH_DEADLINE_S
            if attempt >= PUSH_ATTEMPTS or time.monotonic() > deadline:
                e = next(iter(failed.values()))
                bad = [pending[i] for i in failed]
                first = (str(e).splitlines() or [""])[0]
                raise PushError(f"push to embedding shard(s) {sorted({p.shard for p in bad})} not applied after "
                                f"{attempt} attempts ({type(e).__name__}: {first}); the other shards applied "
                                f"theirs; client.wait(err.pending) re-sends the rest", bad)
            time.sleep(min(0.05 * 2 ** attempt, 1.0))
            attempt += 1
            todo = list(failed)
            for i in todo:
                self._send(pending[i])

    def each(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(s, method).remote(*args) for s in self.shards])

    def call(self, shard: int, method: str, *args):
        import ray

        return ray.get(getattr(self.shards[shard], method).remote(*args))

    def submit(self, method: str, *args) -> list:
        return [getattr(s, method).remote(*args) for s in self.shards]

    def gather(self, submitted: list) -> list:
        import ray

        return ray.get(submitted)

    def close(self) -> None:
        for b in self.buffers:
            if b is not None:
                b.close()
        self.buffers = [None] * len(self.shards)

    def stop(self) -> None:
        import ray

        for s in self.shards:
            ray.kill(s)
