"""`embedding:` section: the sharded embedding parameter server (storage.md sections 2-5).

Every field is honoured by `recmix.actors` (see docs/parameter-server.md for the meaning of each).
The tables themselves (names, dims, features sharing a table) are not declared here: they come from the
dataset's feature schema (`recmix.actors.layout.ps_layout`); `tables` only holds per-table overrides.
Policies with parameters are discriminated unions, so a parameter that a policy would ignore cannot
be written at all (e.g. `betas` only exists for `kind: adam`).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .base import StrictModel
from .data import Name

PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


# ---- initializers (per table) ------------------------------------------------------------------
class ZerosInit(StrictModel):
    kind: Literal["zeros"]


class NormalInit(StrictModel):
    kind: Literal["normal"]
    std: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.01


class UniformInit(StrictModel):
    kind: Literal["uniform"]
    low: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = -0.01
    high: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = 0.01

    @model_validator(mode="after")
    def _order(self) -> "UniformInit":
        if not self.low < self.high:
            raise ValueError(f"uniform initializer needs low < high, got low={self.low} high={self.high}")
        return self


Initializer = Annotated[Union[ZerosInit, NormalInit, UniformInit], Field(discriminator="kind")]


def _default_init() -> NormalInit:
    return NormalInit(kind="normal")


class TableOverride(StrictModel):
    """Per-table settings that differ from the section's defaults (the dim is the schema's)."""

    initializer: Initializer


# ---- admission (storage.md 3.1) ----------------------------------------------------------------
class AdmitAlways(StrictModel):
    policy: Literal["always"]


class AdmitOccurrence(StrictModel):
    """Create a row once its id was seen in `threshold` pulls, counted in a counting filter."""

    policy: Literal["occurrence"]
    threshold: Annotated[int, Field(ge=1, le=1_000_000)]
    filter_slots: Annotated[int, Field(ge=1024, le=1 << 31)] = 1 << 22
    hashes: Annotated[int, Field(ge=1, le=8)] = 3


class AdmitProbability(StrictModel):
    """Each sighting of a not-yet-admitted id creates its row with probability `p`."""

    policy: Literal["probability"]
    p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


Admission = Annotated[Union[AdmitAlways, AdmitOccurrence, AdmitProbability], Field(discriminator="policy")]


# ---- expiry (storage.md 3.3) -------------------------------------------------------------------
class ExpiryOff(StrictModel):
    policy: Literal["off"]


class ExpiryPasses(StrictModel):
    """Delete rows (both tiers) unseen for more than `after` passes, checked at every pass end."""

    policy: Literal["passes"]
    after: Annotated[int, Field(ge=1, le=1_000_000)]


class ExpirySeconds(StrictModel):
    """Delete rows (both tiers) unseen for more than `after` seconds, checked at every pass end."""

    policy: Literal["seconds"]
    after: PosFloat


Expiry = Annotated[Union[ExpiryOff, ExpiryPasses, ExpirySeconds], Field(discriminator="policy")]


# ---- row-wise optimizers (storage.md 4) --------------------------------------------------------
Lr = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Eps = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class SGDConfig(StrictModel):
    kind: Literal["sgd"]
    lr: Lr = 0.05


class RowwiseAdagradConfig(StrictModel):
    kind: Literal["rowwise_adagrad"]
    lr: Lr = 0.05
    eps: Eps = 1e-8


class AdamConfig(StrictModel):
    kind: Literal["adam"]
    lr: Lr = 1e-3
    eps: Eps = 1e-8
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)


OptimizerConfig = Annotated[Union[SGDConfig, RowwiseAdagradConfig, AdamConfig], Field(discriminator="kind")]


class Eviction(str, Enum):
    lru = "lru"
    lfu = "lfu"


class Durability(str, Enum):
    """`checkpoint`: RAM rows are flushed at pass ends, evictions and checkpoints (a crash loses the
    pushes since the last flush). `write_through`: a push is acknowledged only after its rows are
    committed to LMDB with fsync (nothing acknowledged is lost)."""

    checkpoint = "checkpoint"
    write_through = "write_through"


class EmbeddingConfig(StrictModel):
    # Initializer of every table; `tables` overrides it per table name.
    initializer: Initializer = Field(default_factory=_default_init)
    tables: Annotated[dict[Name, TableOverride], Field(max_length=256)] = {}
    shards: Annotated[int, Field(ge=1, le=1024)] = 2
    ram_rows: Annotated[int, Field(ge=16, le=1 << 34)] = 1 << 20
    eviction: Eviction = Eviction.lru
    evict_to: Annotated[float, Field(gt=0, le=1)] = 0.9
    admission: Admission = Field(default_factory=lambda: AdmitAlways(policy="always"))
    expiry: Expiry = Field(default_factory=lambda: ExpiryOff(policy="off"))
    optimizer: OptimizerConfig = Field(default_factory=lambda: RowwiseAdagradConfig(kind="rowwise_adagrad"))
    durability: Durability = Durability.checkpoint
    lmdb_path: Optional[Annotated[str, Field(min_length=1, max_length=1024)]] = None
    map_size: Annotated[int, Field(ge=1 << 20, le=1 << 44)] = 8 << 30
    restore_from: Optional[Annotated[str, Field(min_length=1, max_length=1024)]] = None
    name: Name = "ps"
    num_cpus: Annotated[float, Field(gt=0, le=64)] = 0.25
    max_restarts: Annotated[int, Field(ge=-1, le=1000)] = -1
    seed: Annotated[int, Field(ge=0, le=2**62)] = 0

    @model_validator(mode="after")
    def _budgets(self) -> "EmbeddingConfig":
        if isinstance(self.admission, AdmitOccurrence) and self.admission.filter_slots & (self.admission.filter_slots - 1):
            raise ValueError(f"admission.filter_slots must be a power of two, got {self.admission.filter_slots}")
        return self
