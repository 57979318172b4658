"""Prepared parquet split -> column arrays -> padded torch batches (recmix's collate for ragged lists).

Lists (multi_categorical, sequence) become (N, max_len) int64 padded with -1 (the model masks them);
labels (N, K) float32; `user_key` kept for the warm/cold-user split. Conversion is vectorized over rows.
`collate` turns one pyarrow batch (as Ray Data's `iter_batches(batch_format="pyarrow")` yields it) into the
model's tensor dict: Ray's default tensor collate cannot stack ragged list columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recmix.platform.specs.data import FeatureSchema


@dataclass
class SplitArrays:
    columns: dict[str, np.ndarray]
    labels: np.ndarray          # (N, K) float32
    user_key: np.ndarray        # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        out = {name: torch.from_numpy(col[idx]) for name, col in self.columns.items()}
        out["labels"] = torch.from_numpy(self.labels[idx])
        return out

    def slice(self, lo: int, hi: int) -> "SplitArrays":
        return SplitArrays({k: v[lo:hi] for k, v in self.columns.items()}, self.labels[lo:hi], self.user_key[lo:hi])

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for s in range(0, len(self), batch_size):
            yield self.batch(order[s:s + batch_size])


def _padded(arr: pa.ChunkedArray, max_len: int) -> np.ndarray:
    arr = arr.combine_chunks()
    n = len(arr)
    lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if lens.max(initial=0) > max_len:
        raise ValueError(f"list column has rows longer than max_len {max_len} (longest {int(lens.max())})")
    out = np.full((n, max_len), -1, dtype=np.int64)
    rows = np.repeat(np.arange(n), lens)
    starts = np.cumsum(lens) - lens
    cols = np.arange(values.shape[0]) - np.repeat(starts, lens)
    out[rows, cols] = values
    return out


def to_arrays(table: pa.Table, schema: FeatureSchema) -> SplitArrays:
    cols: dict[str, np.ndarray] = {}
    for f in schema.inputs:
        if f.name not in table.column_names:
            raise ValueError(f"dataset has no column '{f.name}' declared by the feature schema")
        col = table.column(f.name)
        kind = f.type.value
        if kind == "categorical":
            cols[f.name] = col.to_numpy().astype(np.int64)
        elif kind == "dense":
            if f.dim == 1:
                cols[f.name] = col.to_numpy().astype(np.float32)
            else:
                flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                cols[f.name] = flat.reshape(len(col), f.dim)
        else:
            cols[f.name] = _padded(col, int(f.max_len))
    labels = np.stack([table.column(f.name).to_numpy().astype(np.float32) for f in schema.labels], axis=1)
    users = table.column("user_key").to_numpy().astype(np.int64) if "user_key" in table.column_names \
        else np.full(table.num_rows, -1, dtype=np.int64)
    return SplitArrays(cols, labels, users)


def collate(table: pa.Table, schema: FeatureSchema, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    arr = to_arrays(table, schema)
    return {k: v.to(device) for k, v in arr.batch(np.arange(len(arr))).items()}
