"""`PSEmbeddingLookup`: the models' `EmbeddingLookup` interface backed by the sharded parameter server.

* `batch` mode: each lookup pulls the batch's unique ids; backward sums the gradient per unique id
  (index_add_) and pushes it; the shard runs the row-wise optimizer (storage.md 2.2 `push_gradients`).
* `pass` mode: `begin_pass(ids)` pulls the pass's working set onto `device`; lookups gather from it;
  backward applies the row-wise optimizer to the working set in place; `end_pass()` pushes deltas.

The sparse rows are not module parameters: their optimizer runs inside backward (as fused TBE
kernels do), so the dense optimizer never sees them. Legend: N ids in the batch, U unique ids, E dim.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

from recmix.actors.client import PSClient
from recmix.actors.working_set import WorkingSet
from recmix.models.embedding import EmbeddingLookup, TableSpec
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
    """`hbm_rows`: most rows a pass working set may hold (pass mode)."""

    def __init__(self, tables: dict[str, TableSpec], client: PSClient, optimizer,
                 mode: LookupMode = LookupMode.batch, hbm_rows: int = 1 << 20, device: torch.device | str = "cpu"):
        super().__init__(tables)
        assert set(tables) == set(client.dims), (sorted(tables), sorted(client.dims))
        if hbm_rows < 1:
            raise ValueError(f"hbm_rows must be at least 1, got {hbm_rows}")
        self.client, self.mode = client, LookupMode(mode)
        self.device = torch.device(device)
        self.ws = WorkingSet(client, optimizer, hbm_rows, self.device)
        self.pending: list = []

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        if table not in self.tables:
            raise ValueError(f"unknown embedding table '{table}' (known: {', '.join(self.tables)})")
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise ValueError(f"table '{table}': ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        shape = tuple(ids.shape)
        flat = ids.detach().reshape(-1).cpu().numpy()
        e = self.tables[table].dim
        if self.mode is LookupMode.pass_:
            u, inv = np.unique(flat, return_inverse=True)
            key = torch.from_numpy(self.ws.rows(table, u)).to(self.device)
            rows_UE = self.ws.gather(table, key)
        else:
            self.wait()
            p = self.client.pull_unique({table: flat}, copy=False)[table]
            inv, key = p.inverse, p.ids
            rows_UE = torch.from_numpy(np.array(p.values)).to(self.device)
        anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
        inv_N = torch.from_numpy(inv.reshape(-1).astype(np.int64)).to(self.device)
        out = _Lookup.apply(anchor, rows_UE, inv_N, self, table, key)
        return out.reshape(*shape, e)

    def _gradient(self, table: str, key, g_UE: torch.Tensor) -> None:
        if self.mode is LookupMode.pass_:
            self.ws.apply(table, key, g_UE)
        else:
            self.pending += self.client.push({table: (key, g_UE.detach().cpu().numpy())}, wait=False)

    def wait(self) -> int:
        """Wait for the pushes sent by backward (their errors surface here)."""
        pending, self.pending = self.pending, []
        return self.client.wait(pending)

    def begin_pass(self, ids_by_table: dict[str, np.ndarray | torch.Tensor]) -> int:
        if self.mode is not LookupMode.pass_:
            raise ValueError("begin_pass() needs a lookup built with mode 'pass'")
        return self.ws.begin({t: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for t, v in ids_by_table.items()})

    def end_pass(self) -> list[dict]:
        if self.mode is LookupMode.pass_:
            return self.ws.end()
        self.wait()
        return self.client.end_pass()

    def close(self) -> None:
        """Stop the shards behind this lookup (their LMDB files stay)."""
        self.wait()
        self.client.close()
        self.client.backend.stop()


def build_lookup(cfg: EmbeddingConfig, tables: dict[str, TableSpec], device: torch.device | str = "cpu",
                 mode: LookupMode = LookupMode.batch, hbm_rows: int = 1 << 20) -> PSEmbeddingLookup:
    """Start the shard actors for the model's tables (from `tables_from_schema`) and return the lookup."""
    from recmix.actors.actor import create_client

    client = create_client(cfg, {name: t.dim for name, t in tables.items()})
    return PSEmbeddingLookup(tables, client, cfg.optimizer, mode=mode, hbm_rows=hbm_rows, device=device)
