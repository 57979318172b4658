"""Row layout shared by the RAM slabs, the LMDB values and checkpoints; deterministic initializers.

A stored row is one numpy structured record (little-endian, packed):
    v     float32[dim]      embedding values
    s     float32[S]        optimizer state (S from the optimizer, storage.md 4)
    pass  int64             pass id of the last sighting
    time  float64           unix seconds of the last sighting
    count int64             number of pulls that contained the id
LMDB keys are the raw id as 8 bytes big-endian, so byte order equals numeric order (storage.md 2.1).

Initial values are a pure function of (seed, table, id, column): the same id gets the same initial row
whatever the shard count, the order of arrival, or a restart. A lost never-updated row is thus harmless.
"""

from __future__ import annotations

import numpy as np

from recmix.platform.hashing import mix64, table_key
from recmix.platform.specs.embedding import AdamConfig, NormalInit, RowwiseAdagradConfig, SGDConfig, UniformInit, ZerosInit

META_FIELDS = (("pass", "<i8"), ("time", "<f8"), ("count", "<i8"))


def state_width(opt, dim: int) -> int:
    if isinstance(opt, SGDConfig):
        return 0
    if isinstance(opt, RowwiseAdagradConfig):
        return 1
    if isinstance(opt, AdamConfig):
        return 2 * dim + 1          # m[dim], v[dim], step count
    raise AssertionError(f"unhandled optimizer {opt!r}")


def row_dtype(dim: int, s: int) -> np.dtype:
    return np.dtype([("v", "<f4", (dim,)), ("s", "<f4", (s,))] + list(META_FIELDS))


def check_ids(table: str, ids) -> np.ndarray:
    """Ids must be a 1-D int64 array of non-negative values; anything else is a user error."""
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"table '{table}': ids must be a numpy int64 array, got {type(ids).__name__}")
    if ids.dtype != np.int64:
        raise ValueError(f"table '{table}': ids must have dtype int64, got {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"table '{table}': ids must be 1-D, got shape {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"table '{table}': ids must be non-negative, got min {int(ids.min())}")
    return ids


def check_rows(table: str, what: str, x, n: int, width: int) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"table '{table}': {what} must be a float32 numpy array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.shape != (n, width):
        raise ValueError(f"table '{table}': {what} must have shape ({n}, {width}), got {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"table '{table}': {what} contain NaN or inf in {bad} of {n} rows")
    return x


def _unit_uniform(seed: int, table: str, ids: np.ndarray, dim: int, salt: int) -> np.ndarray:
    """Uniform (0, 1) float64 [n, dim] from a counter-based hash of (seed, table, id, column)."""
    base = mix64(ids.astype(np.uint64) ^ table_key(table) ^ np.uint64((seed * 0x9E3779B97F4A7C15 + salt) % (1 << 64)))
    with np.errstate(over="ignore"):
        z = mix64(base[:, None] + np.arange(1, dim + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def init_values(init, seed: int, table: str, ids: np.ndarray, dim: int) -> np.ndarray:
    n = ids.shape[0]
    if isinstance(init, ZerosInit) or n == 0:
        return np.zeros((n, dim), np.float32)
    if isinstance(init, UniformInit):
        u = _unit_uniform(seed, table, ids, dim, 1)
        return (init.low + (init.high - init.low) * u).astype(np.float32)
    if isinstance(init, NormalInit):
        u1 = _unit_uniform(seed, table, ids, dim, 2)
        u2 = _unit_uniform(seed, table, ids, dim, 3)
        return (init.std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
    raise AssertionError(f"unhandled initializer {init!r}")


def keys_of(ids: np.ndarray) -> list:
    """8-byte big-endian LMDB keys, one bytes object per id (built in C by numpy, no Python loop)."""
    return np.ascontiguousarray(ids, dtype=">u8").view("V8").tolist()


def ids_of(keys) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=">u8").astype(np.int64)


def values_of(rows: np.ndarray) -> list:
    rows = np.ascontiguousarray(rows)
    return rows.view(f"V{rows.dtype.itemsize}").tolist()


def rows_of(buffers, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(b"".join(buffers), dtype=dtype)


def segment_sum(ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the rows of duplicate ids (sort + np.add.reduceat); returns (unique sorted ids, sums)."""
    if ids.size == 0:
        return ids, x
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    start = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    if start.size == s.size:
        return s, x[order]
    return s[start], np.add.reduceat(x[order], start, axis=0)
