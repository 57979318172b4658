"""`ps_layout`: the one place the parameter server's tables are derived.

The tables (names, dims, features sharing a table) come from the model's tables, themselves derived
from the dataset's feature schema by `recmix.models.embedding.tables_from_schema`; the `embedding:`
section only adds server knobs and per-table overrides. Everything the shards, the client and the
checkpoints need per table (dim, optimizer state width, row dtype, initializer) and the shard actor
names are computed here once and travel as one `PSLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from recmix.actors.rows import row_dtype, state_width
from recmix.platform.errors import RecmixError
from recmix.platform.hashing import shard_of
from recmix.platform.specs.embedding import EmbeddingConfig


@dataclass(frozen=True)
class PSTable:
    name: str
    dim: int
    state: int              # optimizer state width S (rows.py)
    initializer: object     # one of the initializer configs of specs/embedding.py

    @property
    def dtype(self) -> np.dtype:
        return row_dtype(self.dim, self.state)


@dataclass(frozen=True)
class PSLayout:
    tables: dict[str, PSTable]
    shard_names: tuple[str, ...]
    # None: ids are routed by `hashing.shard_of` (embedding tables, any non-negative id). {table: N}: the
    # table holds exactly the ids 0..N-1, range-partitioned: shard s owns [bounds[s], bounds[s + 1])
    # (the LMN memory's slot ids, `memory.py`).
    ranges: dict[str, int] | None = None

    @property
    def n_shards(self) -> int:
        return len(self.shard_names)

    @property
    def dims(self) -> dict[str, int]:
        return {t.name: t.dim for t in self.tables.values()}

    @property
    def state_widths(self) -> dict[str, int]:
        return {t.name: t.state for t in self.tables.values()}

    def bounds(self, table: str) -> np.ndarray:
        """Range layout: the S + 1 boundaries of the table's id ranges, near-equal parts."""
        n = self.ranges[table]
        return np.arange(self.n_shards + 1, dtype=np.int64) * n // self.n_shards

    def route(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Shard of each id (int64 array). Range layout: an id outside 0..N-1 is a ValueError."""
        if self.ranges is None:
            return shard_of(table, ids, self.n_shards)
        n = self.ranges[table]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)]
            raise ValueError(f"table '{table}' holds ids 0..{n - 1}, got {int(bad[0])} ({bad.size} out of range)")
        return (np.searchsorted(self.bounds(table), ids, side="right") - 1).astype(np.int64)

    def check(self, table: str) -> str:
        if table not in self.tables:
            raise ValueError(f"unknown embedding table '{table}' (known: {', '.join(self.tables)})")
        return table


def ps_layout(cfg: EmbeddingConfig, dims: Mapping[str, int]) -> PSLayout:
    """{table: dim} (e.g. from `tables_from_schema`) + the `embedding:` section -> the shards' layout.
    An override for a table that `dims` lacks is a user error naming it (exit 2 from the CLI)."""
    unknown = sorted(set(cfg.tables) - set(dims))
    if unknown:
        raise RecmixError(f"embedding.tables: {', '.join(repr(t) for t in unknown)} "
                         f"{'is not a table' if len(unknown) == 1 else 'are not tables'} of the feature schema "
                         f"(tables: {', '.join(dims)})")
    assert dims, "a parameter server needs at least one table"
    tables = {}
    for name, dim in dims.items():
        over = cfg.tables.get(name)
        tables[name] = PSTable(name, int(dim), state_width(cfg.optimizer, int(dim)),
                               over.initializer if over is not None else cfg.initializer)
    return PSLayout(tables, tuple(f"{cfg.name}-shard-{i}" for i in range(cfg.shards)))
