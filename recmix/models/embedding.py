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

from recmix.platform.specs.data import FeatureType
from recmix.platform.specs.model import SeqPooling


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


# --- local backend ------------------------------------------------------------------------------------

_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)   # splitmix64 constants as signed int64 (two's complement)
_C2 = 0x94D049BB133111EB - (1 << 64)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 viewed as uint64 (torch's >> on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def bucket_torch(ids: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """`recmix.platform.hashing.bucket` in torch int64 arithmetic (multiplication wraps mod 2^64).

    uint64 u mod n is computed as ((u >> 1) mod n * 2 + (u & 1)) mod n so every step stays non-negative.
    """
    z = ids.to(torch.int64)
    z = z ^ _srl(z, 30)
    z = z * _C1
    z = z ^ _srl(z, 27)
    z = z * _C2
    z = z ^ _srl(z, 31)
    half = _srl(z, 1) % n_buckets
    return (half * 2 + (z & 1)) % n_buckets


class LocalEmbeddingLookup(EmbeddingLookup):
    """torch tables inside the model; hashed tables bucket raw ids with splitmix64 first."""

    def __init__(self, tables: dict[str, TableSpec], init_std: float = 0.01):
        super().__init__(tables)
        self.emb = nn.ModuleDict({name: nn.Embedding(t.n_ids, t.dim) for name, t in self.tables.items()})
        for e in self.emb.values():
            nn.init.normal_(e.weight, 0.0, init_std)

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        spec = self.tables[table]
        if spec.hashed:
            ids = bucket_torch(ids, spec.n_ids)
        elif ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.n_ids):
            raise ValueError(f"table '{table}': ids must lie in [0, {spec.n_ids}), got [{int(ids.min())}, {int(ids.max())}]")
        return self.emb[table](ids)


def masked_rows(lookup: EmbeddingLookup, table: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows `(..., E)` of `ids` of any shape, zero where the id is padding (< 0): padding never reaches `lookup`."""
    mask = ids >= 0
    rows_NE = lookup.lookup(table, ids[mask])
    return rows_NE.new_zeros((*ids.shape, rows_NE.shape[-1])).index_put((mask,), rows_NE)


def tables_from_schema(schema) -> dict[str, TableSpec]:
    """One TableSpec per distinct table of a FeatureSchema (features may share a table)."""
    out: dict[str, TableSpec] = {}
    for f in schema.inputs:
        if f.type is FeatureType.dense:
            continue
        out.setdefault(f.table_name, TableSpec(f.table_name, f.n_ids, int(f.embedding_dim), f.hash_buckets is not None))
    return out


def feature_widths(schema) -> dict[str, int]:
    """Width of each input feature's vector: its embedding dim, or a dense feature's own dim."""
    return {f.name: int(f.embedding_dim) if f.type is not FeatureType.dense else f.dim for f in schema.inputs}


class FeatureEncoder(nn.Module):
    """Batch dict -> one vector per input feature, (B, width), then one per derived feature.

    categorical ids (B,) -> row; multi_categorical / sequence ids (B, L) padded with -1 -> masked mean or sum
    of the rows of the valid ids (only valid ids reach `lookup`); dense (B,) or (B, dim) -> as is.
    Derived features (`recmix.models.derived`) read the raw batch and the lookup, after the schema features.
    """

    def __init__(self, schema, lookup: EmbeddingLookup, seq_pooling: SeqPooling = SeqPooling.mean, derived=()):
        super().__init__()
        self.features = list(schema.inputs)
        self.lookup = lookup
        self.seq_pooling = seq_pooling
        self.derived = nn.ModuleList(derived)
        self.widths = feature_widths(schema) | {d.name: d.width for d in derived}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self.features:
            x = batch[f.name]
            if f.type is FeatureType.dense:
                out[f.name] = x.to(torch.float32).reshape(x.shape[0], f.dim)
            elif f.type is FeatureType.categorical:
                out[f.name] = self.lookup.lookup(f.table_name, x)
            else:
                mask_BL = x >= 0
                pooled_BE = masked_rows(self.lookup, f.table_name, x).sum(1)
                if self.seq_pooling is SeqPooling.mean:
                    pooled_BE = pooled_BE / mask_BL.sum(1, keepdim=True).clamp(min=1).to(pooled_BE.dtype)
                out[f.name] = pooled_BE
            if f.train_dropout and self.training:   # whole rows, not rescaled: what an unseen id gives
                out[f.name] = out[f.name] * (torch.rand(x.shape[0], 1, device=x.device) >= f.train_dropout)
        for d in self.derived:
            out[d.name] = d(batch, self.lookup)
        return out
