"""Ranking requests -> the tensors training fed the model (recmix.jobs.train.data), from the artifact's schema.

Request-level features (`user`): roles user, sequence and context (one value per request, repeated for every
candidate where the model reads them per row). Per-candidate features (`candidates[i]`): role item.
Encoding matches training: categorical int64 ids; lists padded with -1 to max_len; dense float32. Hashed
features take any int64 id (the model buckets it). An id outside a vocabulary (never seen in training) takes
the unknown path: a categorical id becomes 0 (the id the dataset conventions keep free: docs/data.md), a list id
is dropped like padding (with its position in a sequence's aligned attributes, `tokens.attributes`, which
must have the sequence's length); both are counted. Everything else a request gets wrong is a RequestError
(HTTP 422). Columns are converted whole by numpy; only a column numpy reads otherwise is re-read value by
value, to name the bad value.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Annotated, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from recmix.platform.specs.data import NAME_RE, Feature, FeatureRole, FeatureSchema, FeatureType

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = 3.4e38
REQUEST_ROLES = (FeatureRole.user, FeatureRole.sequence, FeatureRole.context)

Number = Union[StrictInt, Annotated[StrictFloat, Field(allow_inf_nan=False)]]
Value = Union[Number, Annotated[list[Number], Field(max_length=100_000)]]
FeatureName = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_RE.pattern)]
Row = Annotated[dict[FeatureName, Value], Field(max_length=4096)]


class RankRequest(BaseModel):
    """POST /v1/rank. Candidate count is also capped by the spec's `limits.max_candidates`."""

    model_config = ConfigDict(extra="forbid")

    request_id: Optional[Annotated[str, Field(min_length=1, max_length=128)]] = None
    user: Row
    candidates: Annotated[list[Row], Field(min_length=1, max_length=100_000)]
    top_k: Optional[Annotated[int, Field(ge=1, le=100_000)]] = None


class RequestError(ValueError):
    """A request the schema cannot encode: answered 422 with this message."""


@dataclass
class Encoded:
    request: dict[str, torch.Tensor]      # request-level features, 1 row each
    candidates: dict[str, torch.Tensor]   # item features, C rows each
    n_candidates: int
    unknown_ids: int
    user_id: Optional[int]                # the first categorical user-role feature's id, as sent

    def fingerprint(self, names: list[str]) -> str:
        """Of the encoded values of `names` (equal encodings, equal user state)."""
        h = hashlib.blake2b(digest_size=16)
        for n in names:
            t = self.request[n]
            h.update(n.encode() + b"\0" + str(t.dtype).encode() + t.numpy().tobytes())
        return h.hexdigest()

    def column(self, name: str) -> torch.Tensor:
        """Feature `name` with C rows, as the training loader builds it (a request-level one repeated: a view)."""
        t = self.candidates.get(name)
        if t is not None:
            return t
        t = self.request[name]
        return t.expand(self.n_candidates, *t.shape[1:])

    def batch(self, names: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
        """Features `names` (default: all) with C rows each (views where repeated)."""
        return {n: self.column(n) for n in (names if names is not None else [*self.request, *self.candidates])}


class FeatureCodec:
    def __init__(self, schema: FeatureSchema):
        self.request_features = [f for f in schema.inputs if f.role in REQUEST_ROLES]
        self.candidate_features = [f for f in schema.inputs if f.role not in REQUEST_ROLES]
        self._user_id = next((f.name for f in self.request_features
                              if f.role is FeatureRole.user and f.type is FeatureType.categorical), None)
        self._cand_keys = {f.name for f in self.candidate_features}
        self._request_units = _units(self.request_features)
        self._candidate_units = _units(self.candidate_features)

    def describe(self) -> dict:
        def one(f: Feature) -> dict:
            d = {"type": f.type.value}
            if f.type is FeatureType.dense:
                d["dim"] = f.dim
            else:
                d["vocab_size" if f.vocab_size else "hash_buckets"] = f.n_ids
            if f.max_len:
                d["max_len"] = f.max_len
            return d
        return {"user": {f.name: one(f) for f in self.request_features},
                "candidate": {f.name: one(f) for f in self.candidate_features}}

    def encode(self, req: RankRequest) -> Encoded:
        self._check_names(req.user, self.request_features, self.candidate_features, "user", "candidates[i]")
        unknown = [0]
        request = _encode(self._request_units, lambda n: [req.user[n]], "user", unknown)
        rows = req.candidates
        # One C-level pass over the rows' key sets; the per-row check only runs to name the bad row.
        if not all(map(operator.eq, itertools.repeat(self._cand_keys), map(dict.keys, rows))):
            for i, row in enumerate(rows):
                self._check_names(row, self.candidate_features, self.request_features, f"candidates[{i}]", "user")
        cands = _encode(self._candidate_units, lambda n: list(map(operator.itemgetter(n), rows)), "candidates", unknown)
        uid = req.user.get(self._user_id) if self._user_id else None
        return Encoded(request, cands, len(rows), unknown[0], uid if isinstance(uid, int) else None)

    @staticmethod
    def _check_names(row: dict, want: list[Feature], other: list[Feature], where: str, other_where: str) -> None:
        names = {f.name for f in want}
        extra = sorted(set(row) - names)
        if extra:
            misplaced = [n for n in extra if n in {f.name for f in other}]
            if misplaced:
                raise RequestError(f"{where}: feature '{misplaced[0]}' belongs in {other_where}")
            raise RequestError(f"{where}: unknown feature '{extra[0]}' (expected: {', '.join(sorted(names))})")
        missing = [f.name for f in want if f.name not in row]
        if missing:
            raise RequestError(f"{where}: missing feature '{missing[0]}'")


def _column(f: Feature, values: list, where: str, unknown: list[int]) -> torch.Tensor:
    """One feature's values of n rows -> its tensor. Vectorized: numpy converts the whole column at once; a
    column numpy cannot take as it should (a float id, a list where a scalar goes, an id outside int64, a
    non-finite number) is re-read value by value by `_column_checked`, which names the bad value."""
    if f.type is FeatureType.categorical:
        ids = _int_array(values)
        if ids is None or ids.ndim != 1:
            return _column_checked(f, values, where, unknown)
        return torch.from_numpy(_known(f, ids, unknown))
    if f.type is FeatureType.dense:
        try:
            arr = np.array(values, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            return _column_checked(f, values, where, unknown)
        n = len(values)
        shapes = ((n,), (n, 1)) if f.dim == 1 else ((n, f.dim),)   # a scalar or a 1-list when dim is 1
        if arr.shape not in shapes or not np.isfinite(arr).all() or (np.abs(arr) > FLOAT32_MAX).any():
            return _column_checked(f, values, where, unknown)
        arr = arr.astype(np.float32)
        return torch.from_numpy(arr.reshape(n) if f.dim == 1 else arr.reshape(n, f.dim))
    return _lists([f], [values], where, unknown)[f.name]


def _units(features: list[Feature]) -> list[list[Feature]]:
    """Encoding units in schema order: a sequence with its aligned attributes (tokens.attributes: one value
    per position, so they are checked and compacted together), every other feature alone."""
    by_name = {f.name: f for f in features}
    attrs = {a for f in features if f.tokens is not None for a in f.tokens.attributes if a in by_name}
    return [[f, *(by_name[a] for a in (f.tokens.attributes if f.tokens is not None else ()) if a in by_name)]
            for f in features if f.name not in attrs]


def _encode(units: list[list[Feature]], column, where: str, unknown: list[int]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for unit in units:
        if len(unit) == 1:
            out[unit[0].name] = _column(unit[0], column(unit[0].name), where, unknown)
        else:
            out.update(_lists(unit, [column(f.name) for f in unit], where, unknown))
    return out


def _lists(fs: list[Feature], columns: list[list], where: str, unknown: list[int]) -> dict[str, torch.Tensor]:
    """List features (ids padded with -1 to max_len) of n rows; fs[1:] are aligned with fs[0]. An unknown id
    (outside a vocabulary) is dropped like padding, with the position in every aligned list: the row's
    remaining positions close up."""
    n = len(columns[0])
    flats, lens = [], []
    for f, values in zip(fs, columns):
        parsed = _flat_ids(f, values)
        if parsed is None:
            _column_checked(f, values, where, [0])   # names the bad value
            raise AssertionError(f"{f.name}: the checked reading accepted what the vectorized one refused")
        flats.append(parsed[0])
        lens.append(parsed[1])
    for f, ln in zip(fs[1:], lens[1:]):
        if not np.array_equal(ln, lens[0]):
            r = int(np.flatnonzero(ln != lens[0])[0])
            at = f"{where}[{r}]" if where == "candidates" else where
            raise RequestError(f"{at}: feature '{f.name}' has {int(ln[r])} ids, '{fs[0].name}' has {int(lens[0][r])} "
                               f"(an aligned attribute takes one value per position)")
    keep = np.ones(flats[0].size, dtype=bool)
    for f, flat in zip(fs, flats):
        if f.vocab_size:
            known = (flat >= 0) & (flat < f.vocab_size)
            unknown[0] += int(flat.size - known.sum())
            keep &= known
    row = np.repeat(np.arange(n), lens[0])[keep]
    slots = np.arange(int(fs[0].max_len)) < np.bincount(row, minlength=n)[:, None]
    out = {}
    for f, flat in zip(fs, flats):
        padded = np.full((n, int(f.max_len)), -1, dtype=np.int64)
        padded[slots] = flat[keep]    # row-major: each row's ids in order
        out[f.name] = torch.from_numpy(padded)
    return out


def _flat_ids(f: Feature, values: list) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(every row's ids concatenated, ids per row), or None for a value the checked reading must name."""
    if not all(map(isinstance, values, itertools.repeat(list))):
        return None
    lens = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    flat = _int_array(list(itertools.chain.from_iterable(values)))
    if flat is None or flat.ndim != 1 or int(lens.max()) > f.max_len:
        return None
    return flat, lens


def _int_array(values: list) -> Optional[np.ndarray]:
    """int64 array of Python ints, or None when numpy reads anything else (floats, lists, ints outside int64)."""
    if not values:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.array(values)
    except (ValueError, OverflowError):
        return None
    return arr if arr.dtype == np.int64 else None


def _known(f: Feature, ids: np.ndarray, unknown: list[int]) -> np.ndarray:
    if f.vocab_size:
        bad = (ids < 0) | (ids >= f.vocab_size)
        unknown[0] += int(bad.sum())
        ids[bad] = 0
    return ids


def _column_checked(f: Feature, values: list, where: str, unknown: list[int]) -> torch.Tensor:
    if f.type is FeatureType.categorical:
        return torch.from_numpy(_known(f, np.array([_int(v, f, where) for v in values], dtype=np.int64), unknown))
    if f.type is FeatureType.dense:
        rows = [_dense(v, f, where) for v in values]
        arr = np.array(rows, dtype=np.float32)
        return torch.from_numpy(arr.reshape(len(values)) if f.dim == 1 else arr.reshape(len(values), f.dim))
    out = np.full((len(values), int(f.max_len)), -1, dtype=np.int64)
    for r, v in enumerate(values):
        if not isinstance(v, list):
            raise RequestError(f"{where}: feature '{f.name}' ({f.type.value}) takes a list of ids, got {type(v).__name__}")
        if len(v) > f.max_len:
            raise RequestError(f"{where}: feature '{f.name}' has {len(v)} ids, more than max_len {f.max_len}")
        ids = np.array([_int(x, f, where) for x in v], dtype=np.int64)
        if f.vocab_size:
            keep = (ids >= 0) & (ids < f.vocab_size)
            unknown[0] += int((~keep).sum())
            ids = ids[keep]
        out[r, :len(ids)] = ids
    return torch.from_numpy(out)


def _int(v, f: Feature, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{where}: feature '{f.name}' ({f.type.value}) takes integer ids, got {_kind(v)}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise RequestError(f"{where}: feature '{f.name}' id {v} is outside int64")
    return v


def _dense(v, f: Feature, where: str) -> list[float]:
    vals = v if isinstance(v, list) else [v]
    if len(vals) != f.dim:
        got = len(vals) if isinstance(v, list) else "a scalar"
        raise RequestError(f"{where}: dense feature '{f.name}' takes {f.dim} number(s), got {got}")
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or abs(x) > FLOAT32_MAX:
            raise RequestError(f"{where}: dense feature '{f.name}' takes finite float32 numbers, got {x!r}")
    return [float(x) for x in vals]


def _kind(v) -> str:
    return "a list" if isinstance(v, list) else repr(v)
