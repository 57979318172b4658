"""`PSEmbeddingLookup`: the models' `EmbeddingLookup` interface backed by the sharded parameter server.

* `batch` mode: each lookup pulls the batch's unique ids; backward sums the gradient per unique id
  (index_add_) and pushes it; the shard runs the row-wise optimizer (storage.md 2.2 `push_gradients`).
* `pass` mode: `begin_pass(ids)` pulls the pass's working set onto `device`; lookups gather from it;
  backward applies the row-wise optimizer to the working set in place; `end_pass()` pushes deltas.
  `prefetch_pass(ids)` pulls the next pass in the background; `run_passes` drives both modes.

Data parallelism: with N workers, DDP averages the dense gradients over the workers; `grad_scale`
(1 / world size) scales the sparse gradients the same way, so that the pushes of N workers on their
parts of a global batch sum to the gradient of the global batch's mean loss (docs/parameter-server.md).

The sparse rows are not module parameters: their optimizer runs inside backward (as fused TBE
kernels do), so the dense optimizer never sees them. Legend: N ids in the batch, U unique ids, E dim.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

from recmix.actors.client import PSClient
from recmix.actors.working_set import WorkingSet
from recmix.models.embedding import EmbeddingLookup, TableSpec
from recmix.platform.specs.data import FeatureType
from recmix.platform.specs.embedding import EmbeddingConfig


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, rows_UE, inv_N, owner, table, key):
        ctx.owner, ctx.table, ctx.key, ctx.n_unique = owner, table, key, rows_UE.shape[0]
        ctx.save_for_backward(inv_N)
        return rows_UE[inv_N]

    @staticmethod
    def backward(ctx, g_NE):
        (inv_N,) = ctx.saved_tensors
        g_UE = torch.zeros(ctx.n_unique, g_NE.shape[1], dtype=torch.float32, device=g_NE.device)
        g_UE.index_add_(0, inv_N, g_NE.float())
        ctx.owner._gradient(ctx.table, ctx.key, g_UE)
        return None, None, None, None, None, None


class LookupMode(str, Enum):
    """`batch`: pull/push per mini-batch (the shards run the optimizer). `pass`: a per-pass working set on
    the trainer's device, deltas pushed at pass end (storage.md 2.2); driven from Python through
    begin_pass/end_pass (the train job runs `batch`)."""

    batch = "batch"
    pass_ = "pass"


class PSEmbeddingLookup(EmbeddingLookup):
    """The model's sparse tables in parameter-server shards.

    `hbm_rows`: most rows a pass working set may hold (pass mode). `grad_scale`: factor on every sparse
    gradient before it is pushed or applied; 1 / world_size under DDP (`grad_scale_for`). `owns_shards`:
    `close()` stops the shards (a lookup from `build_lookup`); an attached lookup never does."""

    def __init__(self, tables: dict[str, TableSpec], client: PSClient, optimizer,
                 mode: LookupMode = LookupMode.batch, hbm_rows: int = 1 << 20, device: torch.device | str = "cpu",
                 grad_scale: float = 1.0, owns_shards: bool = False):
        super().__init__(tables)
        assert set(tables) == set(client.dims), (sorted(tables), sorted(client.dims))
        if hbm_rows < 1:
            raise ValueError(f"hbm_rows must be at least 1, got {hbm_rows}")
        if not (np.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be a positive finite number, got {grad_scale}")
        self.client, self.mode = client, LookupMode(mode)
        self.device = torch.device(device)
        self.grad_scale, self.owns_shards = float(grad_scale), owns_shards
        self.ws = WorkingSet(client, optimizer, hbm_rows, self.device)
        self.pending: list = []
        self.routes: dict[str, PSEmbeddingLookup] = {}     # tables of other groups (`add_group`)

    def add_group(self, other: "PSEmbeddingLookup") -> None:
        """Serve `other`'s tables (another shard group: the LMN memory, batch mode) through this lookup,
        so the model sees one lookup; `wait` and `close` include it. Passes, snapshots and the client
        stay this lookup's own (`other.client` for the other group)."""
        clash = sorted(set(other.tables) & set(self.tables))
        if clash:
            raise ValueError(f"tables {clash} are in both shard groups")
        self.tables.update(other.tables)
        self.routes.update(dict.fromkeys(other.tables, other))

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        if table in self.routes:
            return self.routes[table].lookup(table, ids)
        if table not in self.tables:
            raise ValueError(f"unknown embedding table '{table}' (known: {', '.join(self.tables)})")
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise ValueError(f"table '{table}': ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        shape = tuple(ids.shape)
        e = self.tables[table].dim
        if self.mode is LookupMode.pass_:
            # On the working set's device, without a host round trip: rows of the set, then unique rows.
            pos_N = self.ws.positions(table, ids.detach().reshape(-1).to(self.device))
            key, inv_N = torch.unique(pos_N, return_inverse=True)
            rows_UE = self.ws.gather(table, key)
        else:
            self.wait()
            p = self.client.pull_unique({table: ids.detach().reshape(-1).cpu().numpy()}, copy=False)[table]
            key = (p.ids, np.array(p.admitted))
            # a view of the transfer buffer (one shard) is copied; a reassembled array is already ours
            rows_UE = torch.from_numpy(p.values if p.values.base is None else np.array(p.values)).to(self.device)
            inv_N = torch.from_numpy(p.inverse.reshape(-1).astype(np.int64)).to(self.device)
        anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
        out = _Lookup.apply(anchor, rows_UE, inv_N, self, table, key)
        return out.reshape(*shape, e)

    def _gradient(self, table: str, key, g_UE: torch.Tensor) -> None:
        if self.grad_scale != 1.0:
            g_UE = g_UE * self.grad_scale
        if self.mode is LookupMode.pass_:
            self.ws.apply(table, key, g_UE)
            return
        ids, admitted = key                  # rows not admitted take no update: they are not pushed
        g = g_UE.detach().cpu().numpy()
        if not admitted.all():
            ids, g = ids[admitted], g[admitted]
        if ids.shape[0]:
            self.pending += self.client.push({table: (ids, g)}, wait=False)

    def wait(self) -> int:
        """Wait for every push sent so far: by backward (batch mode) and by `end_pass(wait=False)`
        (pass mode); their errors surface here. Call it before a snapshot or checkpoint."""
        pending, self.pending = self.pending, []
        n = self.client.wait(pending)
        self.ws.settle()
        return n + sum(other.wait() for other in set(self.routes.values()))

    def prefetch_pass(self, ids_by_table: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Pass mode: start pulling the next pass's rows in the background; `begin_pass()` (no ids)
        then opens it. Issued while a pass trains, its pull overlaps the training (double buffering)."""
        self._need_pass("prefetch_pass")
        self.ws.prefetch(_numpy_ids(ids_by_table))

    def begin_pass(self, ids_by_table: dict[str, np.ndarray | torch.Tensor] | None = None) -> int:
        """Pass mode: open a pass over every id it will look up ({table: ids}), or over the ids given to
        `prefetch_pass` when None; returns the number of unique rows in its working set."""
        self._need_pass("begin_pass")
        return self.ws.begin(None if ids_by_table is None else _numpy_ids(ids_by_table))

    def end_pass(self, wait: bool = True) -> list[dict]:
        """Close the pass: pass mode pushes the working set's deltas; batch mode waits for its pushes.
        Then every shard advances its pass counter, flushes and runs expiry; returns their answers.
        Pass mode with wait=False sends the deltas and the pass end and returns [] at once: they
        complete while the next pass trains and are checked by the next `end_pass` or `wait()`."""
        if self.mode is LookupMode.pass_:
            return self.ws.end(wait)
        self.wait()
        return self.client.end_pass()

    def _need_pass(self, what: str) -> None:
        if self.mode is not LookupMode.pass_:
            raise ValueError(f"{what}() needs a lookup built with mode 'pass'")

    def close(self) -> None:
        """Wait for pushes and release the client; stop the shards only if this lookup owns them."""
        self.wait()
        if self.ws.next is not None:
            self.ws.next.thread.join()
        self.client.close()
        if self.owns_shards:
            self.client.backend.stop()
        for other in set(self.routes.values()):
            other.close()


def _numpy_ids(ids_by_table) -> dict[str, np.ndarray]:
    return {t: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for t, v in ids_by_table.items()}


def grad_scale_for(world_size: int) -> float:
    """The `grad_scale` that matches DDP's gradient averaging over `world_size` workers."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    return 1.0 / world_size


def pass_ids(schema, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """{table: ids} that the models' FeatureEncoder will look up for these batches (the pass's working
    set): every categorical id, and the valid (>= 0) ids of multi-categorical and sequence features,
    per table (features sharing a table are merged). Pass it to `begin_pass` / `run_passes`."""
    parts: dict[str, list] = {}
    for batch in batches:
        for f in schema.inputs:
            if f.type is FeatureType.dense:
                continue
            x = batch[f.name].detach().reshape(-1).cpu()
            parts.setdefault(f.table_name, []).append((x if f.type is FeatureType.categorical else x[x >= 0]).numpy())
    return {t: np.unique(np.concatenate(p)).astype(np.int64) for t, p in parts.items()}


T = TypeVar("T")


def run_passes(lookup: PSEmbeddingLookup, passes: Iterable[tuple[dict, T]]) -> Iterator[T]:
    """Drive a lookup over passes: `passes` yields (ids_by_table of the whole pass, payload), e.g. the
    pass's batches. Each payload is yielded while its pass is open; in pass mode the next pass is
    prefetched as soon as this one opens (its pull overlaps training), and the pass is closed
    (`end_pass(wait=False)`: its push overlaps the next pass) when the consumer asks for the next
    payload; the last pass is waited for. Batch mode just closes each pass."""
    it = iter(passes)
    cur = next(it, None)
    if cur is not None and lookup.mode is LookupMode.pass_:
        lookup.prefetch_pass(cur[0])
    while cur is not None:
        if lookup.mode is LookupMode.pass_:
            lookup.begin_pass()
        nxt = next(it, None)
        if nxt is not None and lookup.mode is LookupMode.pass_:
            lookup.prefetch_pass(nxt[0])
        yield cur[1]
        lookup.end_pass(wait=nxt is None)
        cur = nxt


def build_lookup(cfg: EmbeddingConfig, tables: dict[str, TableSpec], device: torch.device | str = "cpu",
                 mode: LookupMode = LookupMode.batch, hbm_rows: int = 1 << 20,
                 grad_scale: float = 1.0) -> PSEmbeddingLookup:
    """Start the shard actors for the model's tables (from `tables_from_schema`) and return a lookup
    that owns them (`close()` stops them). For shards shared by several workers see `group.py`."""
    from recmix.actors.actor import create_client

    client = create_client(cfg, {name: t.dim for name, t in tables.items()})
    return PSEmbeddingLookup(tables, client, cfg.optimizer, mode=mode, hbm_rows=hbm_rows, device=device,
                             grad_scale=grad_scale, owns_shards=True)
