"""`kind: prepare`: turn a source (MovieLens-100K, synthetic, or any parquet) into a prepared dataset."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import StrictModel
from .data import DatasetConfig, FeatureSchema, PathStr, StorageConfig, Uri, check_uri


class ChecksumPolicy(str, Enum):
    """`if_present`: verify SHA256SUMS when the folder has one; `required`: fail without it; `off`."""

    if_present = "if_present"
    required = "required"
    off = "off"


class SplitFractions(StrictModel):
    """Global time-ordered split by position after sorting rows by (timestamp, user, item)."""

    train: Annotated[float, Field(gt=0, lt=1)] = 0.8
    valid: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test: Annotated[float, Field(ge=0, lt=1)] = 0.1

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split fractions must sum to 1, got {self.train} + {self.valid} + {self.test} = {total:g}")
        return self


class MovieLensSource(StrictModel):
    type: Literal["movielens100k"]
    path: PathStr
    checksums: ChecksumPolicy = ChecksumPolicy.if_present
    history_len: Annotated[int, Field(gt=0, le=1000)] = 50


class LongHistorySignal(StrictModel):
    """A label term carried by the user's whole behaviour pool, of which rows show only the last `history_len`."""

    # Length of each user's long pool (the visible history is its most recent `history_len` entries).
    pool_len: Annotated[int, Field(gt=1, le=10_000)]
    # Standard deviation of the term (over users and items) added to the label logit.
    weight: Annotated[float, Field(gt=0, le=10)] = 1.0


class FieldCrossSignal(StrictModel):
    """A label term that is a pure third-order cross of three fields, one per side: the user's occupation, the
    item's first genre and the row's hour (no field or pair of fields predicts it alone)."""

    # Standard deviation of the term added to the label logit.
    weight: Annotated[float, Field(gt=0, le=10)] = 1.0


class SyntheticSource(StrictModel):
    """Zipf-distributed ids, labels from a planted user x item interaction plus noise (docs/data.md)."""

    type: Literal["synthetic"]
    n_rows: Annotated[int, Field(gt=0, le=10_000_000_000)]
    n_users: Annotated[int, Field(gt=1, le=100_000_000)] = 100_000
    n_items: Annotated[int, Field(gt=1, le=100_000_000)] = 50_000
    zipf_exponent: Annotated[float, Field(gt=0, le=5)] = 1.05
    seed: Annotated[int, Field(ge=0)] = 0
    # Each chunk is generated and written independently (one Ray task, one file per split it touches).
    chunk_rows: Annotated[int, Field(gt=0, le=50_000_000)] = 1_000_000
    history_len: Annotated[int, Field(gt=0, le=1000)] = 50
    # Rank of the planted user x item interaction (latent vectors of this length per id).
    rank: Annotated[int, Field(gt=0, le=256)] = 8
    # Standard deviation of the Gaussian noise added to the label logit (the interaction has std 1).
    noise: Annotated[float, Field(ge=0, le=10)] = 1.0
    # Off by default (files stay bit-identical): a label term from the long history (docs/data.md).
    long_history: Optional[LongHistorySignal] = None
    # Off by default (files stay bit-identical): a user x item x context field cross (docs/data.md).
    field_cross: Optional[FieldCrossSignal] = None

    @model_validator(mode="after")
    def _tables_fit(self) -> "SyntheticSource":
        if self.long_history is not None and self.long_history.pool_len <= self.history_len:
            raise ValueError(f"long_history.pool_len ({self.long_history.pool_len}) must exceed history_len "
                             f"({self.history_len}): the signal must reach beyond the history rows show")
        # Per-id tables live in memory (driver and object store): history pools and latent vectors.
        cells = (self.n_users + 1) * (self.history_len + self.rank) + (self.n_items + 1) * self.rank
        if cells > 500_000_000:
            raise ValueError(
                f"per-id tables too large: (n_users + 1) * (history_len + rank) + (n_items + 1) * rank = {cells:,} "
                f"cells (n_users={self.n_users}, n_items={self.n_items}, history_len={self.history_len}, rank={self.rank}); "
                f"the limit is 500,000,000")
        return self


class ParquetSource(StrictModel):
    """Any parquet dataset whose columns are declared in `features` (plus `timestamp` when split by time)."""

    type: Literal["parquet"]
    uri: Uri
    # Integer unix seconds (or an arrow timestamp); rows are split by it, and it becomes `timestamp`.
    timestamp_column: Annotated[str, Field(min_length=1, max_length=256)] = "timestamp"
    # Integer raw user id; becomes `user_key` (UG-Sep groups a user's candidates by it).
    user_key_column: Annotated[str, Field(min_length=1, max_length=256)] = "user_key"
    rows_per_file: Annotated[int, Field(gt=0, le=100_000_000)] = 1_000_000

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


Source = Annotated[Union[MovieLensSource, SyntheticSource, ParquetSource], Field(discriminator="type")]


RESERVED_COLUMNS = ("timestamp", "user_key")


class PrepareSpec(StrictModel):
    kind: Literal["prepare"]
    source: Source
    output: DatasetConfig
    # Built-in sources carry their own schema; a parquet source must declare it.
    features: Optional[FeatureSchema] = None
    splits: SplitFractions = SplitFractions()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _schema_needed(self) -> "PrepareSpec":
        if isinstance(self.source, ParquetSource) and self.features is None:
            raise ValueError("a parquet source needs 'features' declaring its columns")
        if self.features is not None:
            clash = [f.name for f in self.features.features if f.name in RESERVED_COLUMNS]
            if clash:
                raise ValueError(f"feature names {clash} are reserved for the dataset's own columns {list(RESERVED_COLUMNS)}")
        return self
