"""The fixed 64-bit hash recmix uses for (table, id) routing and for hash-bucket features.

`mix64` is the splitmix64 finalizer (Steele et al., "Fast splittable pseudorandom number generators",
OOPSLA 2014): x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; x ^= x >> 27; x *= 0x94d049bb133111eb; x ^= x >> 31,
on unsigned 64-bit integers with wrap-around. It is part of the on-disk contract (checkpoints record
`hash: splitmix64-v1`): changing it re-routes every id, so it never changes silently.

    table_key(name)          = mix64(fnv1a64(utf-8 bytes of the table name))
    route_hash(table, ids)   = mix64(ids XOR table_key(table))
    shard(table, ids, S)     = route_hash(table, ids) mod S
    bucket(ids, n)           = mix64(ids) mod n        (hash-bucket features)
"""

from __future__ import annotations

import numpy as np

HASH_ID = "splitmix64-v1"
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized; int64 input is reinterpreted as uint64 (no copy of the bits)."""
    z = np.asarray(x).astype(np.uint64, copy=True) if np.asarray(x).dtype != np.uint64 else np.array(x, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _C1
        z ^= z >> np.uint64(27)
        z *= _C2
        z ^= z >> np.uint64(31)
    return z


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def table_key(table: str) -> np.uint64:
    return mix64(np.array([fnv1a64(table.encode())], dtype=np.uint64))[0]


def route_hash(table: str, ids: np.ndarray) -> np.ndarray:
    return mix64(np.asarray(ids).astype(np.uint64) ^ table_key(table))


def shard_of(table: str, ids: np.ndarray, n_shards: int) -> np.ndarray:
    if n_shards <= 0:
        raise ValueError(f"n_shards must be positive, got {n_shards}")
    return (route_hash(table, ids) % np.uint64(n_shards)).astype(np.int64)


def bucket(ids: np.ndarray, n_buckets: int) -> np.ndarray:
    if n_buckets <= 0:
        raise ValueError(f"n_buckets must be positive, got {n_buckets}")
    return (mix64(ids) % np.uint64(n_buckets)).astype(np.int64)


def string_id(values) -> np.ndarray:
    """Stable non-negative int64 ids for strings (e.g. zip prefixes), via fnv1a64 then mix64."""
    raw = np.fromiter((fnv1a64(str(v).encode()) for v in values), dtype=np.uint64)
    return (mix64(raw) >> np.uint64(1)).astype(np.int64)
