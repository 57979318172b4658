"""`recmix score ARTIFACT DATASET [--split test]`: a published model scored on a prepared dataset split."""

from __future__ import annotations

from typing import Optional

import numpy as np

from recmix.models.artifact import load_artifact
from recmix.platform.dataset import open_dataset
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig

from .data import to_arrays
from .loop import predict, scores
from .worker import warm_users


def score(artifact_uri: str, dataset_uri: str, split: str = "test", storage_cfg: Optional[StorageConfig] = None,
          batch_size: int = 4096, echo=print, quant: Optional[str] = None) -> dict:
    """AUC and logloss (all rows; warm/cold users on valid/test) of the artifact's model on one split;
    `quant="w8a16"` scores its W8A16 weights."""
    model = load_artifact(artifact_uri, storage_cfg, quant=quant)
    ds = open_dataset(dataset_uri, storage_cfg)
    want = model.artifact["features"]
    if ds.schema.model_dump(mode="json") != want:
        raise RecmixError(f"{dataset_uri}: its feature schema differs from the one {artifact_uri} was trained on")
    data = to_arrays(ds.read_split(split), ds.schema)
    p = predict(model, data, batch_size)
    res = scores(data.labels, p, data.user_key, warm_users(ds) if split != "train" else None)
    res = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in res.items()}
    echo(f"{split}: auc {res['auc']:.6f}  logloss {res['logloss']:.6f}  ({res['rows']:,} rows; model "
         f"{model.artifact['version']})")
    return res
