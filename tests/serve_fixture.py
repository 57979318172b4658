"""A tiny UG-Sep model artifact on the toy schema, written in the training run's artifact layout."""

from __future__ import annotations

import json
import os

import torch
from pydantic import TypeAdapter

from recmix.models import artifact as fmt
from recmix.models.build import build_model
from recmix.models.toy import toy_schema
from recmix.platform.specs.model import ModelConfig

MODEL = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="mlp", n_tokens=4, d_model=16,
             n_layers=2, ffn_mult=2.0, ugsep={"user_tokens": "1:1"})


def write_artifact(root: str, version: str = "v1", seed: int = 0, model: dict | None = None,
                   weight_std: float = 0.5) -> str:
    """<root>/<version>/ (artifact.json, dense.pt) and <root>/LATEST; returns root."""
    spec = model or MODEL
    schema = toy_schema()
    torch.manual_seed(seed)
    m = build_model(TypeAdapter(ModelConfig).validate_python(spec), schema)
    with torch.no_grad():   # larger weights than the init: scores spread over (0, 1), so a wrong row shows
        for p in m.parameters():
            p.normal_(0.0, weight_std)
    d = os.path.join(root, version)
    os.makedirs(d, exist_ok=True)
    torch.save(m.state_dict(), os.path.join(d, fmt.DENSE))
    return _write_doc(root, version, spec, schema, None)


def _write_doc(root: str, version: str, model: dict, schema, embeddings: str | None) -> str:
    """artifact.json of <root>/<version>, then <root>/LATEST; returns root."""
    doc = {"format": fmt.FORMAT, "version": version, "created_utc": "2026-01-01T00:00:00Z", "model": model,
           "features": schema.model_dump(mode="json"), "dense": fmt.DENSE, "embeddings": embeddings,
           "metrics": {"test": {"auc": 0.5}}}
    with open(os.path.join(root, version, fmt.DOC), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(root, fmt.LATEST), "w") as f:
        f.write(version + "\n")
    return root


def request_rows(n_cand: int, seed: int = 0, user: int = 3) -> dict:
    """A valid rank request body on the toy schema (JSON-able)."""
    g = torch.Generator().manual_seed(seed)
    return {"request_id": f"r{seed}",
            "user": {"user_id": user, "zip_prefix": 123456789 + user, "hist_items": [1, 5, 7][: 1 + user % 3],
                     "hour": 13, "score": 0.25},
            "candidates": [{"item_id": int(torch.randint(1, 40, (1,), generator=g)),
                            "genres": [int(x) for x in torch.randint(0, 19, (2,), generator=g)]}
                           for _ in range(n_cand)]}


def offline_scores(model, body: dict) -> list[float]:
    """What load_artifact's model gives for the same rows, built as the training loader builds a batch."""
    C = len(body["candidates"])
    u = body["user"]
    hist = torch.full((C, 6), -1, dtype=torch.int64)
    hist[:, :len(u["hist_items"])] = torch.tensor(u["hist_items"])
    genres = torch.full((C, 4), -1, dtype=torch.int64)
    for i, c in enumerate(body["candidates"]):
        genres[i, :len(c["genres"])] = torch.tensor(c["genres"])
    batch = {"user_id": torch.full((C,), u["user_id"]), "zip_prefix": torch.full((C,), u["zip_prefix"]),
             "hist_items": hist, "hour": torch.full((C,), u["hour"]),
             "score": torch.full((C,), u["score"], dtype=torch.float32),
             "item_id": torch.tensor([c["item_id"] for c in body["candidates"]]), "genres": genres}
    with torch.no_grad():
        return torch.sigmoid(model(batch).logits_BK[:, 0]).tolist()


def write_ps_artifact(root: str, version: str = "v1", seed: int = 0) -> str:
    """An artifact as a parameter-server run publishes it: dense.pt without tables, `embeddings/` a snapshot
    of rows (a few ids left out: they read zeros). Returns root."""
    import numpy as np

    from recmix.models.artifact import SnapshotLookup
    from recmix.models.embedding import tables_from_schema

    schema = toy_schema()
    tables = tables_from_schema(schema)
    rng = np.random.default_rng(seed)
    rows = {}
    for name, t in tables.items():
        ids = np.arange(123456789, 123456789 + 60) if t.hashed else np.arange(t.n_ids)   # raw ids, as requested
        ids = ids[rng.random(ids.size) > 0.1]
        rows[name] = (ids.astype(np.int64), rng.normal(0, 0.5, (ids.size, t.dim)).astype(np.float32))
    torch.manual_seed(seed)
    m = build_model(TypeAdapter(ModelConfig).validate_python(MODEL), schema, SnapshotLookup(tables, rows))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    d = os.path.join(root, version)
    os.makedirs(os.path.join(d, "embeddings"), exist_ok=True)
    torch.save(m.state_dict(), os.path.join(d, fmt.DENSE))
    files = []
    for name, (ids, vals) in rows.items():
        rec = np.zeros(ids.size, dtype=[("v", np.float32, (vals.shape[1],))])
        rec["v"] = vals
        np.savez(os.path.join(d, "embeddings", f"{name}.npz"), ids=ids, rows=rec)
        files.append({"table": name, "file": f"{name}.npz"})
    with open(os.path.join(d, "embeddings", "manifest.json"), "w") as f:
        json.dump({"files": files}, f)
    return _write_doc(root, version, MODEL, schema, "embeddings")
