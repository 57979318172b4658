"""A read-only serving shard group: the artifact's embedding snapshot in Ray actors, for tables too large
for a replica (`embeddings: {mode: shard_group}`; docs/serving.md).

A parameter-server run publishes `<version>/embeddings/` (its tables' rows). By default a replica loads it
whole (`load_artifact`'s SnapshotLookup). With a shard group, `shards` ServingShard actors each load the
rows of the ids with id % shards == their index, and the replica's model reads through `ShardLookup`: a
replica-local hot cache (direct-mapped, `hot_rows` slots per table) in front of one call per shard that
holds missed ids. Serving never writes: the actors are built from the snapshot files, have no method that
changes a row, and nothing here touches the training shards (no admission, no counters).

[choice] One group per replica, owned by it (it dies with the replica, nothing leaks on a version switch or
a scale-down): memory is replicas x snapshot, spread over the cluster's nodes instead of in the replica.
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np
import ray
import torch

from recmix.models.embedding import EmbeddingLookup, TableSpec
from recmix.platform import storage
from recmix.platform.specs.data import StorageConfig


def tables(uri: str, storage_cfg: Optional[StorageConfig], doc: dict) -> dict[str, TableSpec]:
    """The tables an artifact version's embedding snapshot serves (the schema's, and an LMN memory's)."""
    from recmix.models.embedding import tables_from_schema
    from recmix.platform.specs.data import FeatureSchema

    if not doc.get("embeddings"):
        raise ValueError(f"{uri}: the artifact has no embedding snapshot (a parameter-server run publishes one); "
                         "serve it with embeddings.mode replica")
    out = tables_from_schema(FeatureSchema.model_validate(doc["features"]))
    fs, root = storage.resolve(uri, storage_cfg)
    mem = storage.join(root, doc["embeddings"], "memory", "manifest.json")
    if fs.get_file_info(mem).type.name == "File":
        manifest = json.loads(storage.read_bytes(fs, mem))
        out |= {t: TableSpec(t, int(manifest["rows"][t]), int(d["dim"]), False) for t, d in manifest["tables"].items()}
    return out


def _snapshot(uri: str, storage_cfg: Optional[StorageConfig]) -> tuple[dict[str, TableSpec], dict]:
    """(tables, rows by table) of an artifact version's embedding snapshot, read as `load_artifact` reads it."""
    from recmix.models.artifact import _snapshot_rows, read_doc

    doc = read_doc(uri, storage_cfg)
    specs = tables(uri, storage_cfg, doc)
    fs, root = storage.resolve(uri, storage_cfg)
    base = storage.join(root, doc["embeddings"])
    rows = _snapshot_rows(fs, base)[1]
    if fs.get_file_info(storage.join(base, "memory", "manifest.json")).type.name == "File":
        rows |= _snapshot_rows(fs, storage.join(base, "memory"))[1]
    return specs, rows


@ray.remote(num_cpus=0)
class ServingShard:
    """Rows of ids with id % n == index, per table, sorted by id; read-only."""

    def __init__(self, uri: str, storage_doc: Optional[dict], index: int, n: int):
        cfg = StorageConfig.model_validate(storage_doc) if storage_doc is not None else None
        specs, rows = _snapshot(uri, cfg)
        self.dims = {t: spec.dim for t, spec in specs.items()}
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t, (ids, vals) in rows.items():
            mine = np.mod(ids, n) == index
            order = np.argsort(ids[mine], kind="stable")
            self.rows[t] = (ids[mine][order].astype(np.int64), vals[mine][order].astype(np.float32))
        self.calls = 0

    def get(self, table: str, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) rows; an id the snapshot lacks reads zeros (as SnapshotLookup)."""
        self.calls += 1
        keys, vals = self.rows.get(table, (np.zeros(0, np.int64), None))
        out = np.zeros((len(ids), self.dims[table]), dtype=np.float32)
        if keys.size:
            pos = np.searchsorted(keys, ids).clip(max=keys.size - 1)
            hit = keys[pos] == ids
            out[hit] = vals[pos[hit]]
        return out

    def stats(self) -> dict:
        return {"calls": self.calls, "rows": {t: int(k.size) for t, (k, _) in self.rows.items()}}


class ShardLookup(EmbeddingLookup):
    """Reads through the group with a direct-mapped hot cache per table (slot = id mod hot_rows)."""

    def __init__(self, tables: dict[str, TableSpec], shards: list, hot_rows: int):
        super().__init__(tables)
        self.shards, self.hot_rows = shards, hot_rows
        self.slot_ids = {t: np.full(hot_rows, -1, dtype=np.int64) for t in tables} if hot_rows else {}
        self.slot_rows = {t: np.zeros((hot_rows, s.dim), dtype=np.float32) for t, s in tables.items()} if hot_rows else {}
        self.valid = {t: np.zeros(hot_rows, dtype=bool) for t in tables} if hot_rows else {}
        self.hits = self.misses = 0

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu().numpy().astype(np.int64)
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = np.zeros((uniq.size, self.tables[table].dim), dtype=np.float32)
        need = uniq >= 0                                     # padding (-1) reads zeros, never a shard
        if self.hot_rows and uniq.size:
            slots = np.mod(uniq, self.hot_rows)
            cached = need & self.valid[table][slots] & (self.slot_ids[table][slots] == uniq)
            rows[cached] = self.slot_rows[table][slots[cached]]
            self.hits += int(cached.sum())
            need &= ~cached
        miss = np.flatnonzero(need)
        self.misses += int(miss.size)
        if miss.size:
            owner = np.mod(uniq[miss], len(self.shards))
            parts = [(s, miss[owner == s]) for s in np.unique(owner)]
            got = ray.get([self.shards[s].get.remote(table, uniq[m]) for s, m in parts])
            for (_, m), r in zip(parts, got):
                rows[m] = r
            if self.hot_rows:
                slots = np.mod(uniq[miss], self.hot_rows)
                self.slot_ids[table][slots] = uniq[miss]
                self.slot_rows[table][slots] = rows[miss]
                self.valid[table][slots] = True
        return torch.from_numpy(rows[inverse].reshape(*ids.shape, -1)).to(ids.device)


def load_with_shard_group(uri: str, storage_cfg: Optional[StorageConfig], shards: int, hot_rows: int,
                          cpus: float, device: str = "cpu"):
    """`load_artifact`'s model with its tables read through a new ServingShard group (owned by the caller)."""
    from recmix.models.artifact import model_config, read_doc
    from recmix.models.build import build_model
    from recmix.platform.specs.data import FeatureSchema

    doc = read_doc(uri, storage_cfg)
    specs = tables(uri, storage_cfg, doc)
    storage_doc = storage_cfg.model_dump(mode="json") if storage_cfg is not None else None
    group = [ServingShard.options(num_cpus=cpus).remote(uri, storage_doc, i, shards) for i in range(shards)]
    ray.get([g.stats.remote() for g in group])           # loaded (or a one-line error) before serving
    fs, root = storage.resolve(uri, storage_cfg)
    state = torch.load(io.BytesIO(storage.read_bytes(fs, storage.join(root, doc["dense"]))), weights_only=True,
                       map_location="cpu")
    model = build_model(model_config(doc), FeatureSchema.model_validate(doc["features"]),
                        ShardLookup(specs, group, hot_rows))
    model.load_state_dict(state, strict=True)
    model.artifact = doc
    return model.to(device).eval()
