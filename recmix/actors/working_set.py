"""The HBM tier (T0): one pass's working set on the trainer's device (storage.md 2.2 steps 5-8).

`begin` pulls the unique ids of the next pass (values and optimizer state) in one call per shard and
keeps them as tensors on `device` (a GPU when the trainer holds one, else host memory: same code).
Lookups map ids to working-set rows with np.searchsorted over the sorted pass ids; the row-wise
optimizer runs in place on the working set; `end` pushes (new - old) deltas of the touched, admitted
rows and closes the pass on every shard.

Double buffering: `prefetch(ids)` pulls the next pass in a background thread while the current one
trains. Rows that the current pass then updates were pulled too early; `end` records the current
pass's final values of its touched rows and `begin` patches them into the prefetched set, so with one
worker the next pass starts from exactly the rows a synchronous pull would give. (With several
workers, updates that other workers push meanwhile reach this worker one pass later, as with any
`replicated_async` pass.) `end` waits for the prefetch before pushing, so a client never has two
pulls in flight. `end(wait=False)` sends the deltas and the pass end without waiting: they complete
while the next pass trains, and the next `end` (or `settle`) checks them, so their errors surface one
pass later. The next pass does not need them: its rows come from the prefetch and the patch.

Legend: W working-set rows, E embedding dim, S optimizer state width, U unique ids of a step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from recmix.actors import optim
from recmix.actors.client import PSClient


@dataclass
class _TableSet:
    ids_W: np.ndarray
    ids_t_W: torch.Tensor           # ids_W on the device (lookups map ids there)
    v0_WE: np.ndarray
    s0_WS: np.ndarray
    values_WE: torch.Tensor
    state_WS: torch.Tensor
    admitted_W: torch.Tensor
    all_admitted: bool              # the common case: no mask per step
    touched_W: torch.Tensor


class _Prefetch:
    """A background pull of the next pass; `patches` collects rows of passes that ended meanwhile."""

    def __init__(self, client: PSClient, ids_by_table: dict[str, np.ndarray]):
        self.got, self.error = None, None
        self.patches: list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        self.thread = threading.Thread(target=self._run, args=(client, ids_by_table), daemon=True,
                                       name="recmix-ps-prefetch")
        self.thread.start()

    def _run(self, client, ids_by_table):
        try:
            self.got = client.pull_unique(ids_by_table, with_state=True, copy=True)
        except BaseException as e:  # re-raised in the training thread by result()
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.got


class WorkingSet:
    def __init__(self, client: PSClient, optimizer, max_rows: int, device: torch.device | str = "cpu"):
        self.client, self.optimizer, self.max_rows = client, optimizer, max_rows
        self.device = torch.device(device)
        self.sets: dict[str, _TableSet] = {}
        self.next: _Prefetch | None = None
        self.inflight: tuple[list, list] | None = None     # (pending pushes, pass ends) of an end(wait=False)

    @property
    def active(self) -> bool:
        return bool(self.sets)

    def prefetch(self, ids_by_table: dict[str, np.ndarray]) -> None:
        """Start pulling the next pass's rows in the background (taken by the next `begin()`)."""
        if self.next is not None:
            raise ValueError("a prefetched pass is already waiting: call begin_pass() before prefetching another")
        self.next = _Prefetch(self.client, ids_by_table)

    def begin(self, ids_by_table: dict[str, np.ndarray] | None = None) -> int:
        """Open a pass over ids_by_table, or over the prefetched ids when None; returns its unique rows."""
        if self.sets:
            raise ValueError("a pass is already open: call end_pass() before begin_pass()")
        if ids_by_table is None:
            if self.next is None:
                raise ValueError("begin_pass() without ids needs a prefetch_pass() first")
            pre, self.next = self.next, None
            got = pre.result()
        else:
            if self.next is not None:
                raise ValueError("a prefetched pass is waiting: call begin_pass() without ids to open it")
            pre, got = None, self.client.pull_unique(ids_by_table, with_state=True, copy=False)
        total = sum(p.ids.shape[0] for p in got.values())
        if total > self.max_rows:
            raise ValueError(f"the pass touches {total} unique ids, more than hbm_rows={self.max_rows}")
        dev = self.device
        for t, p in got.items():
            v0, s0 = np.array(p.values), np.array(p.state)
            for patch in pre.patches if pre is not None else ():
                if t in patch:
                    _apply_patch(p.ids, v0, s0, *patch[t])
            self.sets[t] = _TableSet(
                p.ids, torch.from_numpy(p.ids).to(dev), v0, s0, torch.from_numpy(v0.copy()).to(dev), torch.from_numpy(s0.copy()).to(dev),
                torch.from_numpy(np.asarray(p.admitted)).to(dev), bool(np.all(p.admitted)), torch.zeros(p.ids.shape[0], dtype=torch.bool, device=dev))
        return total

    def positions(self, table: str, ids_N: torch.Tensor) -> torch.Tensor:
        """Working-set rows of ids (any order, repeats allowed), on the device; an id outside the
        pass is a ValueError."""
        ws = self.sets.get(table)
        if ws is None:
            raise ValueError(f"table '{table}' is not in the open pass (tables: {', '.join(self.sets) or 'none'})")
        if ws.ids_W.shape[0] == 0:
            bad = torch.ones_like(ids_N, dtype=torch.bool)
            pos = ids_N
        else:
            pos = torch.searchsorted(ws.ids_t_W, ids_N).clamp_(max=ws.ids_W.shape[0] - 1)
            bad = ws.ids_t_W[pos] != ids_N
        if ids_N.numel() and bool(bad.any()):
            raise ValueError(f"table '{table}': {int(bad.sum())} ids are not in the pass working set "
                             f"(e.g. {int(ids_N[bad][0])}); begin_pass() must be given every id of the pass")
        return pos

    def gather(self, table: str, rows_U: torch.Tensor) -> torch.Tensor:
        return self.sets[table].values_WE[rows_U]

    def apply(self, table: str, rows_U: torch.Tensor, g_UE: torch.Tensor) -> None:
        """Row-wise optimizer on unique working-set rows; non-admitted rows take no update."""
        ws = self.sets[table]
        if ws.all_admitted:
            r, g = rows_U, g_UE.to(ws.values_WE.dtype)
        else:
            keep = ws.admitted_W[rows_U]
            r, g = rows_U[keep], g_UE[keep].to(ws.values_WE.dtype)
        w, s = optim.apply(self.optimizer, ws.values_WE[r], ws.state_WS[r], g)
        ws.values_WE[r] = w
        ws.state_WS[r] = s
        ws.touched_W[r] = True

    def settle(self) -> list[dict]:
        """Wait for the deltas and pass end sent by `end(wait=False)`; returns the shards' pass ends."""
        if self.inflight is None:
            return []
        (pending, ends), self.inflight = self.inflight, None
        self.client.wait(pending)
        return self.client.wait_end_pass(ends)

    def end(self, wait: bool = True) -> list[dict]:
        """Push the deltas of the touched rows and close the pass on every shard; returns the shards'
        pass ends (wait=False: sends both and returns [], see the module docstring)."""
        self.settle()
        batch, final = {}, {}
        for t, ws in self.sets.items():
            sel = ws.touched_W.cpu().numpy()
            if sel.any():
                v0, s0 = ws.v0_WE[sel], ws.s0_WS[sel]
                dv, ds = ws.values_WE.cpu().numpy()[sel] - v0, ws.state_WS.cpu().numpy()[sel] - s0
                batch[t] = (ws.ids_W[sel], dv, ds)
                final[t] = (ws.ids_W[sel], v0 + dv, s0 + ds)     # the shard's arithmetic: same float32 rows
        if self.next is not None:
            self.next.thread.join()          # one request per shard at a time; the pull saw the old rows
            self.next.patches.append(final)
        pending = self.client.push_deltas(batch, wait=False) if batch else []
        self.sets = {}
        ends = self.client.end_pass(wait=False)
        self.inflight = (pending, ends)
        return [] if not wait else self.settle()


def _apply_patch(ids_W, v_WE, s_WS, pids, pv, ps) -> None:
    """Overwrite the rows of ids_W that are in pids (both sorted unique) with their patched values."""
    pos = np.searchsorted(pids, ids_W)
    pos = np.minimum(pos, max(pids.shape[0] - 1, 0))
    hit = pids[pos] == ids_W if pids.shape[0] else np.zeros(ids_W.shape[0], bool)
    v_WE[hit] = pv[pos[hit]]
    s_WS[hit] = ps[pos[hit]]
