"""`PSEmbeddingLookup`: the models' `EmbeddingLookup` interface backed by the sharded parameter server.

* `batch` mode: each lookup pulls the batch's unique ids; backward sums the gradient per unique id
  (index_add_) and pushes it; the shard runs the row-wise optimizer (storage.md 2.2 `push_gradients`).
* `pass` mode: `begin_pass(ids)` pulls the pass's working set onto `device`; lookups gather from it;
  backward applies the row-wise optimizer to the working set in place; `end_pass()` pushes deltas.

The sparse rows are not module parameters: their optimizer runs inside backward (as fused TBE
kernels do), so the dense optimizer never sees them. Legend: N ids in the batch, U unique ids, E dim.
"""

from __future__ import annotations

import numpy as np
import torch

from recmix.actors.client import PSClient
from recmix.actors.rows import state_width
from recmix.actors.working_set import WorkingSet
from recmix.models.embedding import EmbeddingLookup, TableSpec
from recmix.platform.specs.embedding import EmbeddingConfig, LookupMode


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


class PSEmbeddingLookup(EmbeddingLookup):
    def __init__(self, tables: dict[str, TableSpec], client: PSClient, cfg: EmbeddingConfig,
                 device: torch.device | str = "cpu", shards: list | None = None, root: str | None = None):
        super().__init__(tables)
        self.client, self.cfg, self.mode = client, cfg, cfg.mode
        self.device = torch.device(device)
        self.shards, self.root = shards or client.shards, root
        self.ws = WorkingSet(client, cfg.optimizer, cfg.hbm_rows, self.device)
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
        import ray

        refs, self.pending = self.pending, []
        return sum(ray.get(refs)) if refs else 0

    def begin_pass(self, ids_by_table: dict[str, np.ndarray | torch.Tensor]) -> int:
        if self.mode is not LookupMode.pass_:
            raise ValueError("begin_pass() needs embedding.mode 'pass'")
        return self.ws.begin({t: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for t, v in ids_by_table.items()})

    def end_pass(self) -> list[dict]:
        if self.mode is LookupMode.pass_:
            return self.ws.end()
        self.wait()
        return self.client.end_pass()

    def close(self) -> None:
        """Kill the shard actors this lookup created (their LMDB files stay)."""
        import ray

        self.wait()
        self.client.close()
        for s in self.shards:
            ray.kill(s)


def build_lookup(cfg: EmbeddingConfig, tables: dict[str, TableSpec], device: torch.device | str = "cpu") -> PSEmbeddingLookup:
    """Create (and name) the shard actors of `cfg` and return the lookup the model uses."""
    from recmix.actors.actor import create_shards

    for name, spec in tables.items():
        t = cfg.table(name)
        if t.dim != spec.dim:
            raise ValueError(f"embedding table '{name}': the model asks for dim {spec.dim}, embedding.tables says {t.dim}")
    shards, root = create_shards(cfg)
    client = PSClient(shards, {t.name: t.dim for t in cfg.tables},
                      {t.name: state_width(cfg.optimizer, t.dim) for t in cfg.tables})
    return PSEmbeddingLookup(tables, client, cfg, device=device, shards=shards, root=root)
