"""The embedding-lookup interface the models ask for the rows of a batch's sparse ids.

Legend: N ids (any shape ...), E embedding dim of the table.

Contract:
* `lookup(table, ids)` takes int64 ids of any shape `...` and returns float rows `(..., E)` that carry
  gradient to wherever the table lives.
* Ids are what the dataset holds: for `vocab_size` features ids lie in [0, vocab_size); for `hash_buckets`
  features they are arbitrary non-negative int64 and the *local* backend maps them into buckets with
  `recmix.platform.hashing.bucket`; a parameter-server backend keys rows by the raw id (collision-free).
* Padding is the model's business: it never passes padding ids (it masks them itself).
* Backends: `LocalEmbeddingLookup` (torch tables in the model), and the sharded parameter-server backend in
  `recmix.actors` (same interface; model code does not change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TableSpec:
    name: str
    n_ids: int          # vocab size or hash buckets
    dim: int
    hashed: bool        # ids must be bucketed before a local lookup


class EmbeddingLookup(nn.Module):
    """Abstract base: subclasses implement `lookup`."""

    def __init__(self, tables: dict[str, TableSpec]):
        super().__init__()
        self.tables = dict(tables)

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
