"""`memory:` options of a model: the LMN product-key user memory (spec storage.md §7.2). Pure pydantic.

Present = enabled. N = n_sub**2 slots of width d_value, read top_k at a time through two sub-key sets of
n_sub keys of width d_key / 2. The query of behaviour b of user u is built from the item of b (`sequence`)
and the user features (`user_features`); the memory loss's target adds the behaviour's side sequences
(`side_sequences`, e.g. its rating). Feature names are checked against the schema when the model is built.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, model_validator

from .base import StrictModel
from .data import Name


class QueryNorm(str, Enum):
    layernorm = "layernorm"   # per-query statistics only: a user's reads never depend on the batch (UG-Sep-safe)
    none = "none"


class ValueOptimizer(str, Enum):
    """Row-wise optimizer of the value rows on the memory shards (the parameter-server kinds)."""

    rowwise_adagrad = "rowwise_adagrad"
    sgd = "sgd"
    adam = "adam"


class MemoryConfig(StrictModel):
    n_sub: Annotated[int, Field(ge=2, le=4096)] = 1024          # N = n_sub**2 slots (1024 -> 1,048,576)
    d_key: Annotated[int, Field(ge=2, le=4096)] = 128
    d_value: Annotated[int, Field(ge=1, le=4096)] = 64
    k_axis: Annotated[int, Field(ge=1, le=4096)] = 32
    top_k: Annotated[int, Field(ge=1, le=4096)] = 32
    heads: Annotated[int, Field(ge=1, le=16)] = 1
    query_norm: QueryNorm = QueryNorm.layernorm
    lambda_mem: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 0.1
    smooth_l1_beta: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0
    value_optimizer: ValueOptimizer = ValueOptimizer.rowwise_adagrad
    mask_padding: bool = True
    sequence: Name = "hist_items"                                  # the behaviour sequence: one query per item
    user_features: list[Name] = Field(default_factory=lambda: ["user_id"], max_length=64)
    side_sequences: list[Name] = Field(default_factory=lambda: ["hist_ratings"], max_length=64)

    @property
    def n_slots(self) -> int:
        return self.n_sub * self.n_sub

    @model_validator(mode="after")
    def _check(self) -> "MemoryConfig":
        if self.d_key % 2:
            raise ValueError(f"memory.d_key ({self.d_key}) must be even: it splits into two sub-key halves")
        if self.k_axis > self.n_sub:
            raise ValueError(f"memory.k_axis ({self.k_axis}) must be <= memory.n_sub ({self.n_sub})")
        if self.top_k > self.k_axis:
            raise ValueError(f"memory.top_k ({self.top_k}) must be <= memory.k_axis ({self.k_axis}): with k_axis >= "
                             f"top_k the product-key top-K equals the brute-force top-K over all n_sub**2 slots")
        if self.sequence in self.side_sequences:
            raise ValueError(f"memory.sequence '{self.sequence}' is also in memory.side_sequences")
        return self
