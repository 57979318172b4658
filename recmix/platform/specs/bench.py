"""`kind: bench` and the typed parameters of every benchmark, keyed by bench name.

The names live here (not in the jobs layer's registry) so a spec validates without importing any bench;
tests/unit/test_imports.py checks that `recmix.jobs.registry.BENCHES` has exactly these names.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, ValidationInfo, field_validator

from .base import StrictModel
from .train import LRSchedule


class NoParams(StrictModel):
    """The bench takes no parameters beyond `quick`."""


class Holdout(str, Enum):
    """What the quality bench scores: `contract` trains on train, selects on valid, scores test once; `backtest`
    trains on the train split less its last |valid| rows, selects on those rows, scores valid (test never read)."""

    contract = "contract"
    backtest = "backtest"


class QualityParams(StrictModel):
    """`quality` / `ugsep_quality`: several models trained on one prepared dataset, per seed, test AUC compared."""

    dataset: Optional[Annotated[str, Field(min_length=1)]] = None  # prepared dataset URI; default ${RECMIX_ARTIFACTS:-./artifacts}/ml100k
    # raw MovieLens-100K folder, prepared into `dataset` when that has no manifest; default: $RECMIX_ML100K
    ml100k: Optional[Annotated[str, Field(min_length=1)]] = None
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default=[0, 1, 2], min_length=1, max_length=64)  # quick runs seed 0 only
    workers: Annotated[int, Field(ge=1, le=64)] = 2  # single-threaded training processes (full runs)
    # The training protocol of every run ([choice] defaults: the valid-only sweep of docs/models.md).
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-3
    # linear: lr falls to 0 at the end of `epochs` (the horizon), early stopping or not
    schedule: LRSchedule = LRSchedule.linear
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    batch_size: Annotated[int, Field(ge=2, le=1_000_000)] = 512
    epochs: Annotated[int, Field(ge=1, le=1000)] = 4       # quick runs 1
    patience: Annotated[int, Field(ge=0, le=1000)] = 2
    holdout: Holdout = Holdout.contract
    # a subset of the bench's models (empty: all); pairs whose two models both ran are bootstrapped
    models: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=64)

    @field_validator("seeds", "models")
    @classmethod
    def _unique(cls, v: list, info: ValidationInfo) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} has duplicates: {v}")
        return v


class TrainBenchParams(StrictModel):
    """`train`: Ray Train runs (1 and 2 workers, parameter server vs local tables) and feed rates on one dataset."""

    dataset: Optional[Annotated[str, Field(min_length=1)]] = None  # prepared dataset URI; default: synthetic, in a temp folder
    batch_size: Annotated[int, Field(ge=2, le=1_000_000)] = 1024     # global batch of every run


class ServeBenchParams(StrictModel):
    """`serve`: closed-loop HTTP clients against the baseline and UG-Sep Ranker apps (quick: 3 s per phase)."""

    candidates: Annotated[int, Field(ge=1, le=100_000)] = 256
    clients: Annotated[int, Field(ge=1, le=256)] = 2
    seconds: Annotated[float, Field(gt=0, le=3600)] = 15.0


class LmnBenchParams(StrictModel):
    """`lmn`: product-key memory reads in-process and through the memory shards, against a flat top-K."""

    # slot counts N (squares of n_sub >= 32); empty: 16,384 / 262,144 / 1,048,576 (quick: 1,024 / 4,096 / 16,384)
    slots: list[Annotated[int, Field(ge=1024, le=1 << 24)]] = Field(default_factory=list, max_length=8)
    queries: Annotated[int, Field(ge=1, le=1 << 16)] = 1024           # one batch of queries (quick: 256)
    shards: Annotated[int, Field(ge=1, le=16)] = 2
    threads: Annotated[int, Field(ge=1, le=256)] = 1                  # torch threads of the timed process


# bench name -> its parameters model
BENCH_PARAMS: dict[str, type[StrictModel]] = {
    "datagen": NoParams,
    "lmn": LmnBenchParams,
    "models": NoParams,
    "ps": NoParams,
    "quality": QualityParams,
    "serve": ServeBenchParams,
    "train": TrainBenchParams,
    "ugsep": NoParams,
    "ugsep_quality": QualityParams,
    "w8a16": NoParams,
}
BenchParams = Union[QualityParams, TrainBenchParams, ServeBenchParams, LmnBenchParams, NoParams]


class BenchSpec(StrictModel):
    """`kind: bench`: run a registered benchmark (the same as `recmix bench NAME [--set key=value ...]`)."""

    kind: Literal["bench"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    quick: bool = False
    out: Annotated[str, Field(min_length=1)] | None = None
    # validated against BENCH_PARAMS[name]: unknown keys are errors naming `params.<key>`
    params: BenchParams = Field(default_factory=dict, validate_default=True)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BENCH_PARAMS:
            raise ValueError(f"unknown benchmark '{v}' (known: {', '.join(sorted(BENCH_PARAMS))})")
        return v

    @field_validator("params", mode="before")
    @classmethod
    def _params_of_name(cls, v, info: ValidationInfo):
        # the union alone would pick a branch by shape; the bench name decides (a bad name was reported already)
        model = BENCH_PARAMS.get(info.data.get("name", ""), NoParams)
        return v if type(v) is model else model.model_validate(v.model_dump() if isinstance(v, StrictModel) else v)
