"""The LMN memory shard group: a dense value table, range-partitioned by slot id over its own shard actors.

The memory values (`lmn_values`, N = n_sub**2 rows of d_value, storage.md 7.2) are read K rows per query
by slot id and updated sparsely, like embedding rows, so they use the embedding server's machinery: the
same actor (`actor.EmbeddingShard`), client (dedup, one call per shard, /dev/shm pull buffers, push
retries with request ids), row-wise optimizers (`optim.py`), checkpoints and snapshots. What differs is
the storage core: every slot exists from the start, so `MemoryCore` keeps each shard's range
[bounds[s], bounds[s + 1]) (`PSLayout.ranges`) as two dense arrays, indexed by `id - lo`: no hash
index, admission, eviction, expiry or LMDB tier.

The arrays live in one file per (shard, table) in /dev/shm, mapped by the shard (RAM, never disk): a
killed shard that Ray restarts on the same node maps the same file and has its values back, exactly as
of its last applied push (a push the crash interrupted is retried by the client; a retry of a push the
crash interrupted after it was applied is applied again: request records are kept in the process).
A shard with a GPU (`num_gpus > 0`) holds the arrays on the device and writes them back to the file at
every pass end, flush and checkpoint (a restart loses the updates since). A restart on another node
finds no file: it loads `restore_from` when set, else re-initializes. The driver's `destroy()` removes the
files; the files carry the driver's pid, so a killed driver's files go at the next run's sweep
(`platform/cleanup.py`).

Legend: n rows of a request, E value dim (d_value), S optimizer state width.
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections import OrderedDict
from typing import Annotated, Optional

import numpy as np
from pydantic import Field

from recmix.actors import optim
from recmix.actors.layout import PSLayout, PSTable
from recmix.actors.rows import check_ids, check_rows, init_values, row_dtype, segment_sum, state_width
from recmix.platform import cleanup
from recmix.platform.specs.base import StrictModel
from recmix.platform.specs.data import Name
from recmix.platform.specs.embedding import (EmbeddingConfig, Initializer, NormalInit, OptimizerConfig,
                                             RowwiseAdagradConfig)

MAGIC = b"RMXMEM01"
HEADER = 4096                 # bytes before the values: keeps the arrays page-aligned
INIT_CHUNK = 1 << 16          # rows initialized per step (bounds the float64 temporaries of init_values)
REQUESTS_KEPT = 4096
STAT_KEYS = ("ram_hits", "lmdb_hits", "misses", "admitted", "rejected", "evicted", "written", "expired",
             "pulled", "pushed", "recreated")


class MemoryShardConfig(StrictModel):
    """A memory shard group (set by the train job from `embedding:` and `model.memory`, or by benches)."""

    name: Name = "lmn"
    shards: Annotated[int, Field(ge=1, le=1024)] = 2
    optimizer: OptimizerConfig = Field(default_factory=lambda: RowwiseAdagradConfig(kind="rowwise_adagrad"))
    initializer: Initializer = Field(default_factory=lambda: NormalInit(kind="normal"))
    num_cpus: Annotated[float, Field(gt=0, le=64)] = 0.25
    num_gpus: Annotated[float, Field(ge=0, le=8)] = 0      # > 0: the shard's arrays live on its GPU
    max_restarts: Annotated[int, Field(ge=-1, le=1000)] = -1
    seed: Annotated[int, Field(ge=0, le=2**62)] = 0
    restore_from: Optional[Annotated[str, Field(min_length=1, max_length=1024)]] = None


def memory_config(embedding: EmbeddingConfig, value_optimizer: str, shards: int | None = None) -> MemoryShardConfig:
    """The memory group of a run whose embedding group is `embedding`: its name + `_memory`, its shard count,
    CPUs, restarts and seed; the optimizer kind of `model.memory.value_optimizer` (with the embedding
    optimizer's settings when it is of the same kind, else that kind's defaults)."""
    opt = embedding.optimizer if embedding.optimizer.kind == value_optimizer else {"kind": value_optimizer}
    return MemoryShardConfig(name=f"{embedding.name[:57]}_memory", shards=shards or embedding.shards, optimizer=opt,
                             initializer=embedding.initializer, num_cpus=embedding.num_cpus,
                             max_restarts=embedding.max_restarts, seed=embedding.seed)


def memory_layout(cfg: MemoryShardConfig, tables: dict) -> PSLayout:
    """{name: TableSpec} (n_ids rows of dim each, e.g. `lmn.memory_tables`) -> a range layout."""
    assert tables, "a memory group needs at least one table"
    for t in tables.values():
        if t.n_ids < cfg.shards:
            raise ValueError(f"memory table '{t.name}' has {t.n_ids} rows, fewer than its {cfg.shards} shards")
    return PSLayout({n: PSTable(n, int(t.dim), state_width(cfg.optimizer, int(t.dim)), cfg.initializer)
                     for n, t in tables.items()},
                    tuple(f"{cfg.name}-shard-{i}" for i in range(cfg.shards)),
                    ranges={n: int(t.n_ids) for n, t in tables.items()})


def slab_root(cfg: MemoryShardConfig) -> str:
    """Path prefix of a new group's files (the creating process's pid in the name: cleanup.sweep_stale)."""
    base = cleanup.SHM_DIR if os.access(cleanup.SHM_DIR, os.W_OK) else "/tmp"
    return os.path.join(base, cleanup.shm_name("mem", cfg.name, uuid.uuid4().hex[:10]))


class _Slab:
    """One (shard, table) file: header (magic, rows, dim, state width, ready, pass), values [n, E], state [n, S]."""

    def __init__(self, path: str, n: int, dim: int, s: int):
        self.path, self.n = path, n
        size = HEADER + 4 * n * (dim + s)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)     # owner-only, never a symlink
        try:
            self.reopened = os.fstat(fd).st_size == size
            if not self.reopened:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.head = np.frombuffer(self.mm, np.int64, 8, 0)
        self.values = np.frombuffer(self.mm, np.float32, n * dim, HEADER).reshape(n, dim)
        self.state = np.frombuffer(self.mm, np.float32, n * s, HEADER + 4 * n * dim).reshape(n, s)
        want = np.frombuffer(MAGIC, np.int64)[0]
        self.reopened = self.reopened and self.head[0] == want and tuple(self.head[1:5]) == (n, dim, s, 1)
        if not self.reopened:
            self.head[:5] = (want, n, dim, s, 0)      # ready = 0 until the rows are initialized

    @property
    def pass_id(self) -> int:
        return int(self.head[5])

    def close(self, unlink: bool) -> None:
        self.values = self.state = self.head = None
        try:
            self.mm.close()
        except BufferError:        # a view is still held somewhere: the mapping goes with it
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _NoAdmission:
    """Every slot exists: nothing to admit, no counters to checkpoint."""

    def state(self) -> dict:
        return {}

    def merge(self, table: str, counters) -> None:
        pass


class MemoryCore:
    """One memory shard: the layout's id range of every table as dense arrays (the `ShardCore` API)."""

    def __init__(self, cfg: MemoryShardConfig, layout: PSLayout, shard_id: int, root: str):
        assert layout.ranges is not None and 0 <= shard_id < layout.n_shards, (layout.ranges, shard_id)
        self.cfg, self.layout, self.shard_id, self.n_shards = cfg, layout, shard_id, layout.n_shards
        self.dims, self.swidth = layout.dims, layout.state_widths
        self.dtypes = {t.name: t.dtype for t in layout.tables.values()}
        self.path = f"{root}-{shard_id}"
        self.lo = {t: int(layout.bounds(t)[shard_id]) for t in self.dims}
        self.n = {t: int(layout.bounds(t)[shard_id + 1]) - self.lo[t] for t in self.dims}
        self.slabs = {t: _Slab(f"{self.path}-{t}", self.n[t], d, self.swidth[t]) for t, d in self.dims.items()}
        self.reopened = all(s.reopened for s in self.slabs.values())
        for t, slab in self.slabs.items():
            if not slab.reopened:
                self._init_rows(t)
        self.pass_id = min(s.pass_id for s in self.slabs.values())
        self.admission = _NoAdmission()
        self.device = None
        if cfg.num_gpus > 0:
            import torch

            self.device = torch.device("cuda")
        self._load_device()
        self.stats = {t: dict.fromkeys(STAT_KEYS, 0) for t in self.dims}
        self.requests: OrderedDict[str, int] = OrderedDict()
        self.replayed = 0

    # ---- storage -------------------------------------------------------------------------------
    def _init_rows(self, table: str) -> None:
        slab, lo = self.slabs[table], self.lo[table]
        for a in range(0, slab.n, INIT_CHUNK):
            b = min(slab.n, a + INIT_CHUNK)
            slab.values[a:b] = init_values(self.layout.tables[table].initializer, self.cfg.seed, table,
                                           np.arange(lo + a, lo + b, dtype=np.int64), self.dims[table])
        slab.state[:] = 0
        slab.head[4] = 1

    def _load_device(self) -> None:
        """The arrays the requests use: the slabs themselves, or their copies on the GPU."""
        if self.device is None:
            self.values = {t: s.values for t, s in self.slabs.items()}
            self.state = {t: s.state for t, s in self.slabs.items()}
            return
        import torch

        self.values = {t: torch.from_numpy(s.values.copy()).to(self.device) for t, s in self.slabs.items()}
        self.state = {t: torch.from_numpy(s.state.copy()).to(self.device) for t, s in self.slabs.items()}

    def _local(self, table: str, ids: np.ndarray) -> np.ndarray:
        local = ids - self.lo[table]
        if ids.size and (local.min() < 0 or local.max() >= self.n[table]):
            raise ValueError(f"table '{table}': shard {self.shard_id} holds ids {self.lo[table]}.."
                             f"{self.lo[table] + self.n[table] - 1}, got ids {int(ids.min())}..{int(ids.max())}")
        return local

    def _idx(self, local: np.ndarray):
        if self.device is None:
            return local
        import torch

        return torch.from_numpy(local).to(self.device)

    def _host(self, x) -> np.ndarray:
        return x if self.device is None else x.cpu().numpy()

    def _dev(self, x: np.ndarray):
        if self.device is None:
            return x
        import torch

        return torch.from_numpy(x).to(self.device)

    # ---- API (ShardCore's) ---------------------------------------------------------------------
    def pull(self, req: dict, with_state: bool = False, out: dict | None = None) -> dict:
        """{table: ids} -> {table: (values [n, E], admitted [n] (all True), state [n, S] or None)}."""
        checked = {t: self._local(self.layout.check(t), check_ids(t, ids)) for t, ids in req.items()}
        res = {}
        for table, local in checked.items():
            dest = (out or {}).get(table)
            if self.device is None:
                vals = np.take(self.values[table], local, axis=0, out=dest)
            else:
                vals = self._host(self.values[table][self._idx(local)])
                if dest is not None:
                    dest[...] = vals
                    vals = dest
            state = self._host(self.state[table][self._idx(local)]) if with_state else None
            self.stats[table]["pulled"] += int(local.shape[0])
            self.stats[table]["ram_hits"] += int(local.shape[0])
            res[table] = (vals, np.ones(local.shape[0], bool), state)
        return res

    def push(self, req: dict, request_id: str | None = None) -> int:
        """{table: (ids, grads [n, E])}: duplicates summed, the row-wise optimizer on every row."""
        checked = {}
        for table, (ids, grads) in req.items():
            ids = check_ids(self.layout.check(table), ids)
            g = check_rows(table, "gradients", grads, ids.shape[0], self.dims[table])
            u, g = segment_sum(ids, g)
            checked[table] = (self._local(table, u), g)
        return self._update(checked, lambda w, s, g: optim.apply(self.cfg.optimizer, w, s, g), request_id)

    def push_deltas(self, req: dict, request_id: str | None = None) -> int:
        """{table: (ids, dvalues [n, E], dstate [n, S])}: add deltas (pass-mode working sets)."""
        checked = {}
        for table, (ids, dv, ds) in req.items():
            ids = check_ids(self.layout.check(table), ids)
            dv = check_rows(table, "value deltas", dv, ids.shape[0], self.dims[table])
            ds = check_rows(table, "state deltas", ds, ids.shape[0], self.swidth[table])
            u, d = segment_sum(ids, np.concatenate([dv, ds], axis=1))
            checked[table] = (self._local(table, u), d)
        return self._update(checked, lambda w, s, d: (w + d[:, :w.shape[1]], s + d[:, w.shape[1]:]), request_id)

    def _update(self, checked: dict, step, request_id: str | None) -> int:
        if request_id is not None and request_id in self.requests:
            self.replayed += 1
            return self.requests[request_id]        # a retry of a push applied before
        n = 0
        for table, (local, x) in checked.items():
            idx = self._idx(local)
            w, s = step(self.values[table][idx], self.state[table][idx], self._dev(x))
            self.values[table][idx] = w
            self.state[table][idx] = s
            n += int(local.shape[0])
            self.stats[table]["pushed"] += int(local.shape[0])
        if request_id is not None:
            self.requests[request_id] = n
            while len(self.requests) > REQUESTS_KEPT:
                self.requests.popitem(last=False)
        return n

    def flush(self) -> int:
        """GPU: write the device arrays back to the files (what a restart reads); CPU: nothing to do."""
        if self.device is None:
            return 0
        for t, slab in self.slabs.items():
            slab.values[:] = self.values[t].cpu().numpy()
            slab.state[:] = self.state[t].cpu().numpy()
        return sum(self.n.values())

    def end_pass(self) -> dict:
        self.pass_id += 1
        self.flush()
        for slab in self.slabs.values():
            slab.head[5] = self.pass_id
        return {"pass": self.pass_id, "expired": 0}

    def clear(self, pass_id: int) -> None:
        """Every row back to its initial value and zero optimizer state (before an exact snapshot restore)."""
        for t in self.slabs:
            self._init_rows(t)
            self.slabs[t].head[5] = int(pass_id)
        self.pass_id = int(pass_id)
        self._load_device()

    def drop_ram(self) -> None:
        self.flush()

    def dump(self, table: str):
        """(ids, rows) of every row of the shard's range (checkpoints)."""
        self.layout.check(table)
        self.flush()
        slab = self.slabs[table]
        rows = np.zeros(slab.n, row_dtype(self.dims[table], self.swidth[table]))
        rows["v"], rows["s"] = slab.values, slab.state
        rows["pass"] = self.pass_id
        return np.arange(self.lo[table], self.lo[table] + slab.n, dtype=np.int64), rows

    def load(self, table: str, ids: np.ndarray, rows: np.ndarray) -> int:
        """Store checkpoint rows (ids of this shard's range)."""
        ids = check_ids(self.layout.check(table), ids)
        if rows.dtype != self.dtypes[table] or rows.shape != ids.shape:
            raise ValueError(f"table '{table}': rows must be {ids.shape[0]} records of {self.dtypes[table]}, "
                             f"got {rows.shape} of {rows.dtype}")
        idx = self._idx(self._local(table, ids))
        self.values[table][idx] = self._dev(np.ascontiguousarray(rows["v"]))
        self.state[table][idx] = self._dev(np.ascontiguousarray(rows["s"]))
        self.flush()
        return int(ids.shape[0])

    def set_admission(self, table: str, counters) -> None:
        self.layout.check(table)

    def is_empty(self) -> bool:
        """Whether a restart found nothing to keep (new files: a first start, or a restart on another node)."""
        return not self.reopened

    def io_stats(self) -> dict:
        return {"reopened": self.reopened, "device": str(self.device or "cpu"),
                "bytes": {t: int(self.n[t] * 4 * (self.dims[t] + self.swidth[t])) for t in self.dims}}

    def counts(self) -> dict:
        return {t: {"ram": self.n[t], "lmdb": 0, **self.stats[t]} for t in self.dims}

    def release(self) -> None:
        """Remove the files (the group is being destroyed); the shard is unusable afterwards."""
        self.values = self.state = {}
        for slab in self.slabs.values():
            slab.close(unlink=True)


def in_process_client(cfg: MemoryShardConfig, tables: dict, root: str | None = None):
    """A `PSClient` over `MemoryCore`s in this process (tests, in-process benches); `release_cores` frees them."""
    from recmix.actors.backend import InProcessShards
    from recmix.actors.client import PSClient

    layout = memory_layout(cfg, tables)
    root = root or slab_root(cfg)
    return PSClient(InProcessShards([MemoryCore(cfg, layout, i, root) for i in range(cfg.shards)]), layout)


def release_cores(client) -> None:
    for core in client.backend.shards:
        core.release()
