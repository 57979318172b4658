"""`kind: train`: single-process training and evaluation of one model on a prepared dataset."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator

from .base import StrictModel
from .data import DatasetConfig, StorageConfig, Uri, check_uri
from .embedding import EmbeddingConfig
from .model import ModelConfig


class OptimizerName(str, Enum):
    adagrad = "adagrad"
    adamw = "adamw"


class OptimizerConfig(StrictModel):
    """One optimizer for all parameters (embedding tables included, dense gradients)."""

    name: OptimizerName = OptimizerName.adamw
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0


class EarlyStopping(StrictModel):
    """Stop after `patience` epochs in a row without a better valid AUC (task 0; 0 = at the first such epoch);
    the best epoch's weights are kept."""

    patience: Annotated[int, Field(ge=0, le=1000)] = 2


class TrainSpec(StrictModel):
    kind: Literal["train"]
    dataset: DatasetConfig
    model: ModelConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 512
    eval_batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 4096
    epochs: Annotated[int, Field(gt=0, le=10_000)] = 10
    early_stopping: EarlyStopping = EarlyStopping()
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    # torch intra-op threads; None keeps torch's default. 1 is fastest for small models on a busy machine.
    threads: Optional[Annotated[int, Field(gt=0, le=1024)]] = None
    # Artifacts: <output>/metrics.json and <output>/model.pt (state_dict; torch.load(weights_only=True)),
    # plus <output>/embeddings/ (a parameter-server checkpoint) when `embedding` is set.
    output: Uri
    storage: StorageConfig = StorageConfig()
    # Present = the sparse tables live in parameter-server shards (Ray actors) instead of the model. The
    # tables are the dataset schema's (run in batch mode: pull/push per mini-batch).
    embedding: Optional[EmbeddingConfig] = None

    @field_validator("output")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)
