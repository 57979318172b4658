"""The `EmbeddingShard` Ray actor (a `ShardCore` plus metrics) and the one way shards are created.

Fault tolerance (ray.md 12): shards run with `max_restarts` (default -1: always restart) and
`max_task_retries=3` for reads; Ray never retries `push` / `push_deltas` (`max_task_retries=0`): the
client does (backend.py), re-sending the same request id, which the shard applies once. A restarted shard reopens its
LMDB environment (same path: the path is fixed at creation, not in the actor) and, when that is empty
and `restore_from` is set, loads its rows from that checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time

import numpy as np
import ray

from recmix.actors.backend import RayShards
from recmix.actors.client import PSClient
from recmix.actors.layout import PSLayout, ps_layout
from recmix.actors.memory import MemoryCore, MemoryShardConfig
from recmix.actors.shard import ShardCore
from recmix.actors.shm import Attached
from recmix.platform.specs.embedding import EmbeddingConfig

METRICS_EVERY_S = 1.0


@ray.remote
class EmbeddingShard:
    """An embedding shard (`ShardCore`) or, with a `MemoryShardConfig`, an LMN memory shard (`MemoryCore`,
    memory.py): one actor, client and checkpoint format for both groups."""

    def __init__(self, cfg: EmbeddingConfig | MemoryShardConfig, layout: PSLayout, shard_id: int, root: str):
        from recmix.actors.metrics import ShardMetrics

        self.cfg, self.layout, self.root = cfg, layout, root

        core = MemoryCore if isinstance(cfg, MemoryShardConfig) else ShardCore
        self.core = core(cfg, layout, shard_id, root)
        self.restored_rows = 0
        if cfg.restore_from and self.core.is_empty():
            from recmix.actors.checkpoint import load_into_shard

            self.restored_rows = load_into_shard(self.core, cfg.restore_from)
        self.metrics = ShardMetrics(shard_id, cfg.name)
        self.metrics_at = 0.0
        self.attached = Attached()
        self.handler_s: dict[str, float] = {}          # seconds spent in handlers, per op
        self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed

    def _timed(self, op: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        self.metrics.observe(op, t1 - t0)
        self.handler_s[op] = self.handler_s.get(op, 0.0) + (t1 - t0)
        if t1 - self.metrics_at > METRICS_EVERY_S:
            self.metrics.update(self.core.counts())
            self.metrics_at = t1
            _trim_heap()
        return out

    def pull(self, req: dict, with_state: bool = False) -> dict:
        return self._timed("pull", self.core.pull, req, with_state)

    def pull_shm(self, path: str, spec: dict, with_state: bool = False):
        """Pull through a client's /dev/shm buffer (shm.py): spec {table: (ids offset, n, values offset)};
        ids are read from and values written into the buffer. None if the buffer is not reachable here."""
        mm = self.attached.get(path)
        if mm is None:
            return None
        req, out = {}, {}
        for t, (ioff, n, voff) in spec.items():
            req[t] = np.frombuffer(mm, np.int64, n, ioff).copy()
            dim = self.core.dims.get(t, 0)
            out[t] = np.frombuffer(mm, np.float32, n * dim, voff).reshape(n, dim)
        got = self._timed("pull", self.core.pull, req, with_state, out)
        return {t: (None, ok, st) for t, (_, ok, st) in got.items()}

    @ray.method(max_task_retries=0)
    def push(self, req: dict, request_id: str | None = None) -> int:
        return self._timed("push", self.core.push, req, request_id)

    @ray.method(max_task_retries=0)
    def push_deltas(self, req: dict, request_id: str | None = None) -> int:
        return self._timed("push", self.core.push_deltas, req, request_id)

    def clear(self, pass_id: int) -> None:
        self.core.clear(pass_id)

    def describe(self) -> tuple:
        """(config, layout, LMDB root) of the group this shard belongs to (`group.attach`)."""
        return self.cfg, self.layout, self.root

    def end_pass(self) -> dict:
        out = self.core.end_pass()
        self.metrics.update(self.core.counts())
        _trim_heap()
        return out

    def flush(self) -> int:
        return self.core.flush()

    def drop_ram(self) -> None:
        self.core.drop_ram()

    def dump(self, table: str):
        return self.core.dump(table)

    def admission_state(self) -> dict:
        return self.core.admission.state()

    def load(self, table: str, ids, rows) -> int:
        return self.core.load(table, ids, rows)

    def load_admission(self, table: str, counters) -> None:
        self.core.admission.merge(table, counters)

    def set_admission(self, table: str, counters) -> None:
        self.core.set_admission(table, counters)

    def counts(self) -> dict:
        return self.core.counts()

    def info(self) -> dict:
        return {"pid": os.getpid(), "pass": self.core.pass_id, "path": self.core.path,
                "reconstructed": self.reconstructed, "restored_rows": self.restored_rows,
                "replayed_pushes": self.core.replayed, **self.core.io_stats(),
                "handler_s": dict(self.handler_s)}

    def release(self) -> None:
        """The group is being destroyed: a memory shard removes its files (an embedding shard's LMDB stays)."""
        self.core.release()

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict:
        """Resident memory of this process from /proc (anonymous vs file-backed, e.g. LMDB's mmap)."""
        _trim_heap()
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
        return out


def _trim_heap() -> None:
    """Give freed request temporaries back to the OS (glibc keeps them in the heap otherwise), so the
    shard's resident memory follows its RAM budget rather than its largest past request."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def create_shards(cfg: EmbeddingConfig | MemoryShardConfig, layout: PSLayout, root: str | None = None,
                  namespace: str | None = None, detached: bool = False) -> tuple[list, str]:
    """Start the layout's named shard actors (in `namespace`, default the job's; `detached`: they outlive
    the creating process); returns (handles, LMDB root or memory file prefix). Waits until all are up."""
    root = root or getattr(cfg, "lmdb_path", None) or tempfile.mkdtemp(prefix=f"recmix-{cfg.name}-")
    handles = []
    where = f" in namespace '{namespace}'" if namespace else ""
    for i, name in enumerate(layout.shard_names):
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            pass
        else:
            raise ValueError(f"an embedding shard named '{name}' already exists{where}; choose another embedding.name")
        opts = dict(name=name, namespace=namespace, num_cpus=cfg.num_cpus, max_restarts=cfg.max_restarts,
                    max_task_retries=3, num_gpus=getattr(cfg, "num_gpus", 0))
        if detached:
            opts["lifetime"] = "detached"
        handles.append(EmbeddingShard.options(**opts).remote(cfg, layout, i, root))
    ray.get([h.pid.remote() for h in handles])
    return handles, root


def create_client(cfg: EmbeddingConfig, dims: dict[str, int], root: str | None = None) -> PSClient:
    """Derive the layout, start the shard actors and return a client over them (Ray backend)."""
    layout = ps_layout(cfg, dims)
    handles, _ = create_shards(cfg, layout, root)
    return PSClient(RayShards(handles, layout), layout)
