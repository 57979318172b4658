"""The model artifact: what a training run publishes and `load_artifact` rebuilds a model from.

Layout: `<root>/<version>/artifact.json` (format, model spec, feature schema, metrics, package versions, file
names), `<root>/<version>/dense.pt` (the full state_dict: dense weights and local embedding tables,
`torch.load(weights_only=True)`), and `<root>/LATEST` (the newest version's name, written last). A
parameter-server run's tables are not in the state_dict: `<version>/embeddings/` holds a serving snapshot of
their rows (`recmix.actors.checkpoint` format), loaded back here into local tables.
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np
import torch

from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import FeatureSchema, StorageConfig

from .embedding import EmbeddingLookup, TableSpec, tables_from_schema

FORMAT = "recmix-model-artifact-v1"
DOC = "artifact.json"
LATEST = "LATEST"
DENSE = "dense.pt"
W8A16 = "w8a16.pt"


def resolve_version(uri: str, storage_cfg: Optional[StorageConfig] = None) -> str:
    """`uri` itself when it holds an artifact.json, else `uri/<LATEST>`."""
    fs, root = storage.resolve(uri, storage_cfg)
    try:
        found = fs.get_file_info(storage.join(root, DOC)).type.name == "File"
    except OSError as e:   # an unreachable or silent S3 endpoint, rejected credentials: one line
        raise RecmixError(f"{uri}: {storage.describe(e, storage_cfg)}") from None
    if found:
        return uri.rstrip("/")
    try:
        version = storage.read_bytes(fs, storage.join(root, LATEST)).decode().strip()
    except RecmixError:
        raise RecmixError(f"{uri}: not a model artifact (no {DOC} and no {LATEST})") from None
    return storage.join(uri.rstrip("/"), version)


def read_doc(uri: str, storage_cfg: Optional[StorageConfig] = None) -> dict:
    fs, root = storage.resolve(uri, storage_cfg)
    try:
        doc = json.loads(storage.read_bytes(fs, storage.join(root, DOC)))
    except ValueError:
        raise RecmixError(f"{uri}: {DOC} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RecmixError(f"{uri}: {DOC} is not a {FORMAT} document")
    return doc


# Model fields whose default changed between releases (TokenMixer-Large's tokenizer and the defaults that follow
# it): `model` holds only the fields the spec set, so an unset one is read from `model_resolved`, as trained.
_PINNED = ("tokenizer", "global_token", "n_tokens")


def model_config(doc: dict):
    """The artifact's validated model config, with the defaults it was trained with."""
    from pydantic import TypeAdapter

    from recmix.platform.specs.model import ModelConfig

    resolved = doc.get("model_resolved") or {}
    pinned = {k: resolved[k] for k in _PINNED if k in resolved and k not in doc["model"]}
    return TypeAdapter(ModelConfig).validate_python({**doc["model"], **pinned})


def load_artifact(uri: str, storage_cfg: Optional[StorageConfig] = None, device: str | torch.device = "cpu",
                  quant: Optional[str] = None, backend: Optional[str] = None):
    """The trained model, rebuilt from its spec and schema, weights loaded strictly, in eval mode.

    `uri` is an artifact root (its LATEST version is taken) or one version folder. `model.artifact` holds
    the artifact.json document (metrics, schema, packages). `quant="w8a16"` loads the artifact's W8A16
    weights (a run with `quantize:`) into quantized layers; `backend` picks their kernel (default auto)."""
    from .build import build_model

    uri = resolve_version(uri, storage_cfg)
    doc = read_doc(uri, storage_cfg)
    schema = FeatureSchema.model_validate(doc["features"])
    cfg = model_config(doc)
    fs, root = storage.resolve(uri, storage_cfg)
    state = torch.load(io.BytesIO(storage.read_bytes(fs, storage.join(root, doc["dense"]))), weights_only=True,
                       map_location="cpu")
    lookup = _snapshot_lookup(fs, storage.join(root, doc["embeddings"]), schema) if doc.get("embeddings") else None
    model = build_model(cfg, schema, lookup)
    model.load_state_dict(state, strict=True)
    if quant is not None:
        if quant != "w8a16":
            raise ValueError(f"quant must be 'w8a16' or None, got {quant!r}")
        if not doc.get("w8a16"):
            raise RecmixError(f"{uri}: the artifact has no W8A16 weights (train with `quantize:` to add them)")
        from .quantize import load_quantized

        model = load_quantized(model, storage.join(uri, doc["w8a16"]), storage_cfg, backend=backend or "auto")
    model.artifact = doc
    return model.to(device).eval()


class SnapshotLookup(EmbeddingLookup):
    """Read-only tables from a parameter-server serving snapshot: id -> its stored row (sorted ids, binary
    search); an id the run never pulled reads zeros. Rows are non-persistent buffers, so the state_dict is the
    dense weights only, as in the run."""

    def __init__(self, tables: dict[str, TableSpec], rows: dict[str, tuple[np.ndarray, np.ndarray]]):
        super().__init__(tables)
        self.names = list(tables)
        for i, name in enumerate(self.names):
            ids, vals = rows.get(name, (np.zeros(0, np.int64), np.zeros((0, tables[name].dim), np.float32)))
            order = np.argsort(ids, kind="stable")
            self.register_buffer(f"ids_{i}", torch.from_numpy(ids[order].astype(np.int64)), persistent=False)
            self.register_buffer(f"rows_{i}", torch.from_numpy(vals[order].astype(np.float32)), persistent=False)

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        i = self.names.index(table)
        keys_U, rows_UE = getattr(self, f"ids_{i}"), getattr(self, f"rows_{i}")
        if keys_U.numel() == 0:
            return rows_UE.new_zeros(*ids.shape, self.tables[table].dim)
        pos = torch.searchsorted(keys_U, ids.clamp(min=0)).clamp(max=keys_U.numel() - 1)
        hit = (keys_U[pos] == ids) & (ids >= 0)
        return rows_UE[pos] * hit.unsqueeze(-1).to(rows_UE.dtype)


def _snapshot_lookup(fs, base: str, schema: FeatureSchema) -> SnapshotLookup:
    """The schema's tables from the snapshot at `base`, and the LMN memory values (`lmn_values`, every slot)
    from `base/memory` when the run had a memory shard group (`recmix.jobs.train.ps_group`)."""
    tables, rows = tables_from_schema(schema), _snapshot_rows(fs, base)[1]
    mem = storage.join(base, "memory")
    if fs.get_file_info(storage.join(mem, "manifest.json")).type.name == "File":
        manifest, mrows = _snapshot_rows(fs, mem)
        tables |= {t: TableSpec(t, int(manifest["rows"][t]), int(d["dim"]), False) for t, d in manifest["tables"].items()}
        rows |= mrows
    return SnapshotLookup(tables, rows)


def _snapshot_rows(fs, base: str) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    manifest = json.loads(storage.read_bytes(fs, storage.join(base, "manifest.json")))
    parts: dict[str, list] = {}
    for f in manifest["files"]:
        if f.get("filter"):
            continue
        with np.load(io.BytesIO(storage.read_bytes(fs, storage.join(base, f["file"])))) as z:
            parts.setdefault(f["table"], []).append((z["ids"], z["rows"]["v"]))
    return manifest, {t: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
                      for t, ps in parts.items()}
