"""The HBM tier (T0): one pass's working set on the trainer's device (storage.md 2.2 steps 5-8).

`begin` pulls the unique ids of the next pass (values and optimizer state) in one call per shard and
keeps them as tensors on `device` (a GPU when the trainer holds one, else host memory: same code).
Lookups map ids to working-set rows with np.searchsorted over the sorted pass ids; the row-wise
optimizer runs in place on the working set; `end` pushes (new - old) deltas of the touched, admitted
rows and closes the pass on every shard.

Legend: W working-set rows, E embedding dim, S optimizer state width, U unique ids of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recmix.actors import optim
from recmix.actors.client import PSClient


@dataclass
class _TableSet:
    ids_W: np.ndarray
    v0_WE: np.ndarray
    s0_WS: np.ndarray
    values_WE: torch.Tensor
    state_WS: torch.Tensor
    admitted_W: torch.Tensor
    touched_W: torch.Tensor


class WorkingSet:
    def __init__(self, client: PSClient, optimizer, max_rows: int, device: torch.device | str = "cpu"):
        self.client, self.optimizer, self.max_rows = client, optimizer, max_rows
        self.device = torch.device(device)
        self.sets: dict[str, _TableSet] = {}

    @property
    def active(self) -> bool:
        return bool(self.sets)

    def begin(self, ids_by_table: dict[str, np.ndarray]) -> int:
        if self.sets:
            raise ValueError("a pass is already open: call end_pass() before begin_pass()")
        got = self.client.pull_unique(ids_by_table, with_state=True, copy=False)
        total = sum(p.ids.shape[0] for p in got.values())
        if total > self.max_rows:
            raise ValueError(f"the pass touches {total} unique ids, more than hbm_rows={self.max_rows}")
        dev = self.device
        for t, p in got.items():
            self.sets[t] = _TableSet(
                p.ids, np.array(p.values), np.array(p.state),
                torch.from_numpy(np.array(p.values)).to(dev), torch.from_numpy(np.array(p.state)).to(dev),
                torch.from_numpy(np.asarray(p.admitted)).to(dev), torch.zeros(p.ids.shape[0], dtype=torch.bool, device=dev))
        return total

    def rows(self, table: str, ids: np.ndarray) -> np.ndarray:
        ws = self.sets.get(table)
        if ws is None:
            raise ValueError(f"table '{table}' is not in the open pass (tables: {', '.join(self.sets) or 'none'})")
        pos = np.searchsorted(ws.ids_W, ids)
        pos = np.minimum(pos, ws.ids_W.shape[0] - 1)
        bad = ws.ids_W[pos] != ids if ws.ids_W.shape[0] else np.ones(ids.shape[0], bool)
        if bad.any():
            raise ValueError(f"table '{table}': {int(bad.sum())} ids are not in the pass working set "
                             f"(e.g. {int(ids[bad][0])}); begin_pass() must be given every id of the pass")
        return pos

    def gather(self, table: str, rows_U: torch.Tensor) -> torch.Tensor:
        return self.sets[table].values_WE[rows_U]

    def apply(self, table: str, rows_U: torch.Tensor, g_UE: torch.Tensor) -> None:
        """Row-wise optimizer on unique working-set rows; non-admitted rows take no update."""
        ws = self.sets[table]
        keep = ws.admitted_W[rows_U]
        r, g = rows_U[keep], g_UE[keep].to(ws.values_WE.dtype)
        w, s = optim.apply(self.optimizer, ws.values_WE[r], ws.state_WS[r], g)
        ws.values_WE[r] = w
        ws.state_WS[r] = s
        ws.touched_W[r] = True

    def end(self) -> list[dict]:
        batch = {}
        for t, ws in self.sets.items():
            sel = ws.touched_W.cpu().numpy()
            if sel.any():
                dv = ws.values_WE.cpu().numpy()[sel] - ws.v0_WE[sel]
                ds = ws.state_WS.cpu().numpy()[sel] - ws.s0_WS[sel]
                batch[t] = (ws.ids_W[sel], dv, ds)
        if batch:
            self.client.push_deltas(batch)
        self.sets = {}
        return self.client.end_pass()
