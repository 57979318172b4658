"""Data-side component configs: feature schema, dataset location, storage endpoint.

The feature schema is the contract between data preparation, the models and the parameter server:
prepare writes it into the dataset manifest, training reads it back from there.

Parquet column types per feature type (checked by `recmix.jobs.prepare` against real files):

| type               | parquet column          | notes                                              |
|--------------------|-------------------------|----------------------------------------------------|
| categorical        | int64                   | ids in [0, vocab_size) or hashed into hash_buckets |
| multi_categorical  | list<int64>             | at most max_len ids, pooled by the model           |
| sequence           | list<int64>             | time-ordered, most recent last, at most max_len    |
| dense              | float32 (dim 1) or list<float32> of length dim |                             |
| label              | float32 0/1             | role `label`, type `dense`, dim 1                  |

Prepared datasets hold exactly these types (plus `timestamp` and `user_key`, int64; layout in
docs/data.md). A parquet source may use any integer width, bool/int labels and an arrow timestamp:
prepare casts them.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Optional

from pydantic import AfterValidator, Field, field_validator, model_validator

from .base import StrictModel

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_RE.pattern)]


class FeatureRole(str, Enum):
    user = "user"
    item = "item"
    context = "context"
    sequence = "sequence"
    label = "label"


class FeatureType(str, Enum):
    categorical = "categorical"
    multi_categorical = "multi_categorical"
    dense = "dense"
    sequence = "sequence"


class GroupSide(str, Enum):
    """Which side of a request a token group belongs to (UG-Sep keeps `user` groups candidate-free)."""

    user = "user"
    candidate = "candidate"


class TokenGroup(StrictModel):
    """A semantic token group: the features the tokenizer turns into one token."""

    name: Name
    side: GroupSide = GroupSide.candidate


class SeqPool(str, Enum):
    """A candidate-free pooling of a sequence's position representations (one user-side vector each)."""

    mean = "mean"            # masked mean over valid positions
    recency = "recency"      # softmax of a learned logit per recency rank (0 = most recent)
    attention = "attention"  # a few learned queries attend over the positions (multi-query pooling)


class TargetAttention(str, Enum):
    """DIN-style candidate-side attention: the target item as the query over the sequence."""

    softmax = "softmax"  # scores normalized over valid positions
    sigmoid = "sigmoid"  # independent gates per position, mean over valid positions (DIN's unnormalized weights)
    none = "none"


class ItemNeighbors(StrictModel):
    """Item-item neighbourhood of the candidate over the sequence (recmix/models/neighbors.py).

    Before training, each item's `k` most similar items are fitted from the training split (cosine of
    user-centred labels, shrunk by co-occurrence count / (count + `shrink`)); a row's vector is, per value of
    `attribute` (the rating), the summed similarity between the candidate and the history positions carrying
    that value. Training rows use neighbours fitted without their own user's fold (`folds` folds of users by
    `user`), so a row never sees similarities computed from its own label.
    """

    attribute: Name                                  # one of the tokens' attributes (categorical, vocab <= 256)
    user: Name                                       # user-side categorical feature that identifies the row's user
    k: Annotated[int, Field(ge=1, le=1024)] = 64
    shrink: Annotated[float, Field(ge=0, le=1e6)] = 10.0
    folds: Annotated[int, Field(ge=2, le=32)] = 5


class SequenceTokens(StrictModel):
    """Position-aware tokens of a `sequence` feature (recmix/models/sequence.py).

    Each position combines the item with its aligned attributes (other sequence columns of the same group
    and max_len, one value per position: a rating, a time-gap bucket) through a small MLP, so which item
    got which attribute survives pooling. `pools` give user-side vectors in the sequence's own group;
    `target_attention` gives one candidate-side vector in the group of `target` (a categorical candidate
    feature sharing the sequence's embedding table, e.g. item_id).
    """

    attributes: list[Name] = Field(default_factory=list, max_length=16)
    width: Annotated[int, Field(gt=0, le=1024)] = 32
    pools: list[SeqPool] = Field(default_factory=lambda: [SeqPool.mean, SeqPool.recency, SeqPool.attention], max_length=3)
    attention_queries: Annotated[int, Field(ge=1, le=64)] = 2
    target_attention: TargetAttention = TargetAttention.softmax
    target: Optional[Name] = None
    hidden: Annotated[int, Field(gt=0, le=4096)] = 32   # target-attention scorer MLP width
    neighbors: Optional[ItemNeighbors] = None           # candidate-side item-item neighbourhood token (needs target)

    @model_validator(mode="after")
    def _check(self) -> "SequenceTokens":
        for what, values in (("attributes", [str(a) for a in self.attributes]), ("pools", [p.value for p in self.pools])):
            if len(set(values)) != len(values):
                raise ValueError(f"sequence tokens: {what} has duplicates: {values}")
        if self.target_attention is not TargetAttention.none and self.target is None:
            raise ValueError(f"sequence tokens: target_attention {self.target_attention.value} needs a target "
                             "(the candidate feature used as the query, e.g. item_id)")
        if self.neighbors is not None and self.target is None:
            raise ValueError("sequence tokens: neighbors needs a target (the candidate feature, e.g. item_id)")
        if self.neighbors is not None and self.neighbors.attribute not in self.attributes:
            raise ValueError(f"sequence tokens: neighbors.attribute '{self.neighbors.attribute}' must be one of the "
                             f"attributes {[str(a) for a in self.attributes]}")
        if not self.pools and self.target_attention is TargetAttention.none and self.neighbors is None:
            raise ValueError("sequence tokens: no pools and target_attention none build nothing; remove `tokens`")
        return self


class Feature(StrictModel):
    name: Name
    role: FeatureRole
    type: FeatureType
    vocab_size: Optional[Annotated[int, Field(gt=0)]] = None
    hash_buckets: Optional[Annotated[int, Field(gt=0)]] = None
    embedding_dim: Optional[Annotated[int, Field(gt=0, le=4096)]] = None
    # Features naming the same table share one embedding table (history item ids and item_id, say).
    table: Optional[Name] = None
    dim: Annotated[int, Field(gt=0, le=65536)] = 1
    group: Optional[Name] = None
    max_len: Optional[Annotated[int, Field(gt=0, le=100_000)]] = None
    tokens: Optional[SequenceTokens] = None   # sequence features only: position-aware tokens (derived features)
    # Share of training rows that see this feature's vector as zeros, as an id never seen in training looks
    # (an untrained row of a small-init table is ~0): trains the cold-user case. No effect in evaluation.
    train_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _check_type_fields(self) -> "Feature":
        sparse = self.type is not FeatureType.dense
        if self.tokens is not None and self.type is not FeatureType.sequence:
            raise ValueError(f"{self.type.value} feature '{self.name}' takes no tokens (only sequence features do)")
        if self.role is FeatureRole.label:
            if self.type is not FeatureType.dense or self.dim != 1:
                raise ValueError(f"label feature '{self.name}' must have type 'dense' and dim 1, got type '{self.type.value}' dim {self.dim}")
            if self.group is not None:
                raise ValueError(f"label feature '{self.name}' must not name a token group (got '{self.group}')")
            if self.train_dropout:
                raise ValueError(f"label feature '{self.name}' takes no train_dropout (got {self.train_dropout})")
        elif self.group is None:
            raise ValueError(f"feature '{self.name}' needs a token group ('group')")
        if sparse:
            if (self.vocab_size is None) == (self.hash_buckets is None):
                raise ValueError(
                    f"{self.type.value} feature '{self.name}' needs exactly one of vocab_size or hash_buckets "
                    f"(got vocab_size={self.vocab_size}, hash_buckets={self.hash_buckets})")
            if self.embedding_dim is None:
                raise ValueError(f"{self.type.value} feature '{self.name}' needs embedding_dim")
            if self.dim != 1:
                raise ValueError(f"{self.type.value} feature '{self.name}' takes no dim (got {self.dim}); use embedding_dim")
        else:
            for field in ("vocab_size", "hash_buckets", "embedding_dim", "table", "max_len"):
                if getattr(self, field) is not None:
                    raise ValueError(f"dense feature '{self.name}' takes no {field} (got {getattr(self, field)})")
        needs_len = self.type in (FeatureType.sequence, FeatureType.multi_categorical)
        if needs_len and self.max_len is None:
            raise ValueError(f"{self.type.value} feature '{self.name}' needs max_len")
        if not needs_len and self.max_len is not None:
            raise ValueError(f"{self.type.value} feature '{self.name}' takes no max_len (got {self.max_len})")
        return self

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def n_ids(self) -> int:
        """Rows of the embedding table (vocabulary or hash buckets)."""
        assert self.type is not FeatureType.dense
        return int(self.vocab_size or self.hash_buckets)


class FeatureSchema(StrictModel):
    groups: list[TokenGroup] = Field(min_length=1)
    features: list[Feature] = Field(min_length=2)

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[TokenGroup]) -> list[TokenGroup]:
        seen: set[str] = set()
        for g in groups:
            if g.name in seen:
                raise ValueError(f"duplicate token group '{g.name}'")
            seen.add(g.name)
        return groups

    @model_validator(mode="after")
    def _check_references(self) -> "FeatureSchema":
        names: set[str] = set()
        group_names = {g.name for g in self.groups}
        sides = {g.name: g.side for g in self.groups}
        tables: dict[str, Feature] = {}
        for f in self.features:
            if f.name in names:
                raise ValueError(f"duplicate feature name '{f.name}'")
            names.add(f.name)
            if f.group is not None and f.group not in group_names:
                raise ValueError(f"feature '{f.name}' references unknown token group '{f.group}' (known: {sorted(group_names)})")
            if f.group is not None and sides[f.group] is GroupSide.user and f.role in (FeatureRole.item, FeatureRole.context):
                raise ValueError(f"{f.role.value} feature '{f.name}' cannot sit in user-side group '{f.group}'")
            if f.type is not FeatureType.dense:
                other = tables.setdefault(f.table_name, f)
                if (other.n_ids, other.embedding_dim) != (f.n_ids, f.embedding_dim):
                    raise ValueError(
                        f"features '{other.name}' and '{f.name}' share table '{f.table_name}' but differ in size: "
                        f"{other.n_ids}x{other.embedding_dim} vs {f.n_ids}x{f.embedding_dim}")
        if not self.labels:
            raise ValueError("the feature schema needs at least one feature with role 'label'")
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.tokens is not None:
                _check_tokens(f, by_name, sides)
        used = {f.group for f in self.features if f.group is not None}
        empty = [g for g in sorted(group_names) if g not in used]
        if empty:
            raise ValueError(f"token groups without features: {empty}")
        return self

    @property
    def labels(self) -> list[Feature]:
        return [f for f in self.features if f.role is FeatureRole.label]

    @property
    def inputs(self) -> list[Feature]:
        return [f for f in self.features if f.role is not FeatureRole.label]

    def group_features(self, group: str) -> list[Feature]:
        return [f for f in self.features if f.group == group]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)


def _check_tokens(f: Feature, by_name: dict[str, Feature], sides: dict[str, GroupSide]) -> None:
    """Attributes are aligned sequences of the same group and max_len; the target shares the sequence's table
    and sits in a candidate-side group (its attention token reads the candidate)."""
    where = f"feature '{f.name}' tokens"
    for a in f.tokens.attributes:
        other = by_name.get(a)
        if other is None:
            raise ValueError(f"{where}: attribute '{a}' is not a feature (known: {sorted(by_name)})")
        if a == f.name or other.type is not FeatureType.sequence or other.tokens is not None:
            raise ValueError(f"{where}: attribute '{a}' must be another sequence feature without tokens of its own")
        if (other.group, other.max_len) != (f.group, f.max_len):
            raise ValueError(f"{where}: attribute '{a}' must share group and max_len with '{f.name}' "
                             f"(got group '{other.group}' max_len {other.max_len} vs '{f.group}' {f.max_len})")
    t = f.tokens.target
    if t is None:
        return
    tf = by_name.get(t)
    if tf is None or tf.type is not FeatureType.categorical or tf.table_name != f.table_name:
        raise ValueError(f"{where}: target '{t}' must be a categorical feature sharing table '{f.table_name}' with '{f.name}'")
    if sides[tf.group] is not GroupSide.candidate:
        raise ValueError(f"{where}: target '{t}' must sit in a candidate-side group (its group '{tf.group}' is user-side)")
    nb = f.tokens.neighbors
    if nb is None:
        return
    if tf.vocab_size is None:
        raise ValueError(f"{where}: neighbors need target '{t}' with a vocab_size (a hashed target has no item rows to fit)")
    a = by_name[nb.attribute]
    if a.vocab_size is None or a.vocab_size > 256:
        raise ValueError(f"{where}: neighbors.attribute '{nb.attribute}' needs a vocab_size <= 256 (one output per value), "
                         f"got {a.vocab_size}")
    uf = by_name.get(nb.user)
    if uf is None or uf.type is not FeatureType.categorical or uf.group is None or sides[uf.group] is not GroupSide.user:
        raise ValueError(f"{where}: neighbors.user '{nb.user}' must be a categorical feature in a user-side group")


class StorageConfig(StrictModel):
    """Object-store endpoint. Credentials come from the environment only (AWS_ACCESS_KEY_ID, ...).

    An endpoint that never answers fails one S3 operation within about
    `max_attempts * (connect_timeout_s + request_timeout_s + 1)` seconds (the 1 s covers retry back-off;
    78 s with the defaults); `request_timeout_s` is the longest wait for the next byte, not for a whole transfer.
    """

    endpoint_url: Optional[Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$")]] = None
    region: Annotated[str, Field(min_length=1, max_length=64)] = "us-east-1"
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @property
    def worst_case_s(self) -> float:
        """The documented bound on one S3 operation against an endpoint that never answers."""
        return self.max_attempts * (self.connect_timeout_s + self.request_timeout_s + 1.0)


def check_path(value: str) -> str:
    """No NUL or other control characters: the OS would cut the path there (or refuse it mid-run)."""
    bad = next((c for c in value if ord(c) < 32 or c == "\x7f"), None)
    if bad is not None:
        raise ValueError(f"path {value!r} contains the control character {bad!r}")
    return value


def check_uri(value: str) -> str:
    """Local path, file:// or s3://bucket/prefix; other schemes are rejected by name."""
    check_path(value)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", value)
    if m and m.group(1) not in ("s3", "file"):
        raise ValueError(f"unsupported URI scheme '{m.group(1)}://' in '{value}' (use a local path, file:// or s3://)")
    if value.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", value):
        raise ValueError(f"invalid S3 bucket in '{value}' (bucket names are 3-63 lowercase letters, digits, '.' or '-')")
    if not value.strip():
        raise ValueError("empty URI")
    return value


Uri = Annotated[str, Field(min_length=1, max_length=1024)]
# A local path or URI read as-is (no scheme check): control characters refused.
PathStr = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(check_path)]


class DatasetConfig(StrictModel):
    """Where a prepared dataset lives: `<uri>/_manifest.json` names the current version's files."""

    uri: Uri
    format: str = Field(default="parquet", pattern=r"^parquet$")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)
