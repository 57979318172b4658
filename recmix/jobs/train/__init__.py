"""`kind: train`: train one model on a prepared dataset, evaluate valid/test, write metrics and weights.

Artifacts under `spec.output`: `metrics.json` (valid/test AUC + logloss, warm/cold-user test AUC, history,
parameter/FLOP counts) and `model.pt` (state_dict of the best epoch, `torch.load(..., weights_only=True)`).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from recmix.models import counters
from recmix.models.build import build_model
from recmix.platform import storage
from recmix.platform.dataset import open_dataset
from recmix.platform.specs.train import TrainSpec

from .data import SplitArrays, to_arrays
from .loop import FitResult, fit, make_optimizer, train_step  # noqa: F401  (train_step is the public unit)


def load_splits(spec: TrainSpec):
    ds = open_dataset(spec.dataset.uri, spec.storage)
    splits = {s: to_arrays(ds.read_split(s), ds.schema) for s in ("train", "valid", "test")}
    return ds.schema, splits


@dataclass(kw_only=True)
class TrainResult(FitResult):
    model: torch.nn.Module              # the best epoch's weights (PS-backed tables are closed after training)
    wall_s: float
    arch: str
    seed: int
    counts: dict                        # parameter / FLOP counts (models/counters.py)
    embeddings: str | None = None       # URI of the parameter-server checkpoint (with `embedding:`)
    ps_rows: list | None = None         # per-shard row counts at the end (with `embedding:`)

    def metrics(self) -> dict:
        """What metrics.json holds (besides the spec): everything but the model and the test probabilities."""
        skip = {"model", "test_probs"} | ({"embeddings", "ps_rows"} if self.embeddings is None else set())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def train(spec: TrainSpec, splits: dict[str, SplitArrays] | None = None, schema=None, log=print, write: bool = True,
          cluster=None) -> TrainResult:
    """Fit and evaluate; `splits`/`schema` may be passed in to reuse loaded data across runs (benches).

    With `spec.embedding` the sparse tables live in parameter-server shards on the Ray cluster `cluster`."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if splits is None:
        schema, splits = load_splits(spec)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    sharded = None
    if spec.embedding is not None:
        from .sparse import ShardedTables

        sharded = ShardedTables(spec, schema, cluster)
    embeddings = ps_rows = None
    try:
        model = build_model(spec.model, schema, sharded.lookup if sharded else None)
        opt = make_optimizer(model, spec.optimizer)
        t0 = time.perf_counter()
        fitted = fit(model, splits["train"], splits["valid"], splits["test"], optimizer=opt, batch_size=spec.batch_size,
                     eval_batch_size=spec.eval_batch_size, epochs=spec.epochs, patience=spec.early_stopping.patience,
                     seed=spec.seed, log=log, snapshot=sharded.snapshot if sharded else None,
                     restore=sharded.restore if sharded else None)
        if sharded is not None and write:
            embeddings = sharded.save_final()
            ps_rows = sharded.lookup.client.counts()
    finally:
        if sharded is not None:
            sharded.close()
    res = TrainResult(**{f.name: getattr(fitted, f.name) for f in fields(FitResult)}, model=model,
                      wall_s=round(time.perf_counter() - t0, 2), arch=spec.model.arch, seed=spec.seed,
                      counts=counters.model(spec.model, schema), embeddings=embeddings, ps_rows=ps_rows)
    t = res.test
    log(f"[train] test auc {t['auc']:.4f} (warm {t.get('auc_warm', float('nan')):.4f}, cold {t.get('auc_cold', float('nan')):.4f})"
        f"  logloss {t['logloss']:.4f}  best epoch {res.best_epoch}")
    if write:
        fs, root = storage.resolve(spec.output, spec.storage)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        storage.write_bytes_atomic(fs, storage.join(root, "model.pt"), buf.getvalue())
        doc = {**res.metrics(), "spec": spec.model_dump(mode="json")}
        storage.write_bytes_atomic(fs, storage.join(root, "metrics.json"), json.dumps(doc, indent=2, default=float).encode())
        log(f"[train] wrote {spec.output}/metrics.json and model.pt")
    return res


def run(spec: TrainSpec, cluster=None) -> dict:
    """CLI entry (`recmix run train.yaml`): one training process; Ray only hosts parameter-server shards."""
    res = train(spec, cluster=cluster)
    return {k: v for k, v in res.metrics().items() if k != "history"}
