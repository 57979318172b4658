"""Small schemas and random batches for tests and micro-benchmarks (no dataset needed).

The schema mirrors the ml-100k layout: user / history / item / context groups, a hashed feature, a
multi-categorical and a sequence sharing the item table, one dense feature, one label.
"""

from __future__ import annotations

import torch

from recmix.platform.specs.data import FeatureSchema, FeatureType


def toy_schema(emb_dim: int = 8, n_labels: int = 1) -> FeatureSchema:
    feats = [
        dict(name="user_id", role="user", type="categorical", vocab_size=50, embedding_dim=emb_dim, group="user"),
        dict(name="zip_prefix", role="user", type="categorical", hash_buckets=17, embedding_dim=emb_dim, group="user"),
        dict(name="hist_items", role="sequence", type="sequence", vocab_size=40, embedding_dim=emb_dim, table="item_id",
             max_len=6, group="history"),
        dict(name="item_id", role="item", type="categorical", vocab_size=40, embedding_dim=emb_dim, group="item"),
        dict(name="genres", role="item", type="multi_categorical", vocab_size=19, embedding_dim=emb_dim, max_len=4, group="item"),
        dict(name="hour", role="context", type="categorical", vocab_size=24, embedding_dim=emb_dim, group="context"),
        dict(name="score", role="context", type="dense", group="context"),
    ]
    feats += [dict(name=f"label{i}" if i else "label", role="label", type="dense") for i in range(n_labels)]
    groups = [dict(name="user", side="user"), dict(name="history", side="user"), dict(name="item"), dict(name="context")]
    return FeatureSchema.model_validate(dict(groups=groups, features=feats))


def toy_batch(schema: FeatureSchema, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded tensors as the training loader builds them: lists padded with -1, labels (B, K) float."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for f in schema.inputs:
        if f.type is FeatureType.dense:
            out[f.name] = torch.randn(batch, generator=g)
        elif f.type is FeatureType.categorical:
            hi = f.vocab_size or 10**12
            out[f.name] = torch.randint(0, hi, (batch,), generator=g)
        else:
            ids = torch.randint(0, f.n_ids if f.vocab_size else 10**12, (batch, f.max_len), generator=g)
            lens = torch.randint(0, f.max_len + 1, (batch, 1), generator=g)
            out[f.name] = torch.where(torch.arange(f.max_len).unsqueeze(0) < lens, ids, torch.full_like(ids, -1))
    out["labels"] = torch.randint(0, 2, (batch, len(schema.labels)), generator=g).float()
    return out
