"""Synthetic ranking data with a planted user x item interaction (model in docs/data.md).

* Ids: user and item ranks are Zipf(`zipf_exponent`) distributed, sampled by inverse CDF with a guide
  table (exact, about one cdf probe per draw); a seeded permutation maps ranks to ids 1..n.
* Label: z = <U_u, V_i> / sqrt(rank) + b_u + b_i + noise * N(0, 1); label = z > 0. U, V ~ N(0, 1) and
  b ~ N(0, 0.5^2) are per-id tables drawn from the seed, so the interaction (std 1) is only learnable
  from (user, item) pairs: a linear model sees b_u + b_i, an interaction model sees all of z.
* History: each user has a fixed pool of `history_len` Zipf items with ratings 1..5 from the same planted
  score; a row's history is the last l items of the pool, l ~ U{0..history_len}. Gathering from the pool
  keeps histories cheap (no per-row sampling, no per-element dot products). Histories have no time: the
  gap bucket of the k-th most recent entry (k = 1, 2, ...) is that of k minutes.
* Long history (optional, `long_history`): each user's pool extends `pool_len - history_len` entries further
  back (Zipf items, never shown); taste_u = mean of a planted item scalar a_i over the whole pool, standardized
  over users, and z gains weight * taste_u * c_i. Rows show at most the last `history_len` entries, so only
  a model that infers the long-run taste (from ids or what other users' behaviour teaches) recovers the term.
  Its tables come from SeedSequence([seed, 3]): without it every table and file is unchanged.
* Field cross (optional, `field_cross`): z gains weight * C[occupation_u, first genre_i, hour_r], C a random
  occupation x genre x hour table reduced to its pure third-order part (every one- and two-field margin
  subtracted) and scaled to std 1: only a model that crosses a user, an item and a context field recovers it.
  Drawn from SeedSequence([seed, 4]); without it every table and file is unchanged.
* Row r (0-based, global) has timestamp T0 + r; chunks of `chunk_rows` are generated independently from
  SeedSequence([seed, chunk]), so files do not depend on how many workers ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recmix.platform.specs.data import FeatureSchema
from recmix.platform.specs.prepare import SyntheticSource

from . import builtin

T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC
BIAS_STD = 0.5
RATING_EDGES = np.array([-1.5, -0.5, 0.5, 1.5], np.float32)


def schema(src: SyntheticSource) -> FeatureSchema:
    return builtin.builtin_schema(src.n_users, src.n_items, src.history_len)


class Zipf:
    """Exact inverse-CDF sampling of ranks 0..n-1 with P(k) ~ (k+1)^-s, via a guide table of 4n slots."""

    def __init__(self, n: int, s: float):
        p = np.arange(1, n + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(p)
        self.cdf /= self.cdf[-1]
        self.cdf[-1] = 1.0
        self.slots = 4 * n
        # guide[k] = first rank whose cdf exceeds k / slots: the answer for u in slot k is at or after it.
        self.guide = np.searchsorted(self.cdf, np.arange(self.slots) / self.slots, side="right").astype(np.int32)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        u = rng.random(size)
        idx = self.guide[np.minimum((u * self.slots).astype(np.int64), self.slots - 1)]
        need = np.nonzero(self.cdf[idx] <= u)[0]
        while len(need):  # a few passes over a shrinking subset (tail slots hold several ranks)
            idx[need] += 1
            need = need[self.cdf[idx[need]] <= u[need]]
        return idx


@dataclass
class Tables:
    """Per-id tables, a pure function of (seed, n_users, n_items, rank, history_len, zipf_exponent)."""

    users: Zipf
    items: Zipf
    user_perm: np.ndarray     # rank -> id (1-based), int32
    item_perm: np.ndarray
    U: np.ndarray             # [n_users + 1, rank] float32
    V: np.ndarray             # [n_items + 1, rank] float32
    bu: np.ndarray
    bi: np.ndarray
    user_attr: dict           # name -> [n_users + 1] int64
    year: np.ndarray          # [n_items + 1] int64
    genres: pa.ListArray      # item id -> genre ids
    pool_items: np.ndarray    # [n_users + 1, history_len] int32, most recent last
    pool_ratings: np.ndarray  # [n_users + 1, history_len] int8
    taste: np.ndarray | None = None  # [n_users + 1] float32, long-pool taste (mean 0, std 1 over users 1..n)
    taste_item: np.ndarray | None = None  # [n_items + 1] float32, c_i: how much item i rewards the taste
    taste_weight: float = 0.0
    cross: np.ndarray | None = None   # [N_OCCUPATIONS, N_GENRES, 24] float32, already times the weight
    first_genre: np.ndarray | None = None   # [n_items + 1] int64


def score(t: Tables, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The planted logit without noise: interaction (std 1) plus user and item biases (plus the long-history term)."""
    inter = np.einsum("ij,ij->i", t.U[users], t.V[items]) / np.float32(np.sqrt(t.U.shape[1]))
    z = inter + t.bu[users] + t.bi[items]
    if t.taste is not None:
        z = z + np.float32(t.taste_weight) * t.taste[users] * t.taste_item[items]
    return z


def build_tables(src: SyntheticSource) -> Tables:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([src.seed, 1])))
    nu, ni = src.n_users, src.n_items
    users, items = Zipf(nu, src.zipf_exponent), Zipf(ni, src.zipf_exponent)
    user_perm = (rng.permutation(nu) + 1).astype(np.int32)
    item_perm = (rng.permutation(ni) + 1).astype(np.int32)
    U = rng.standard_normal((nu + 1, src.rank), dtype=np.float32)
    V = rng.standard_normal((ni + 1, src.rank), dtype=np.float32)
    bu = (BIAS_STD * rng.standard_normal(nu + 1)).astype(np.float32)
    bi = (BIAS_STD * rng.standard_normal(ni + 1)).astype(np.float32)
    zip_codes = np.arange(100, 1000)
    user_attr = {
        "age_bucket": rng.integers(1, 8, nu + 1),
        "gender": rng.integers(0, 2, nu + 1),
        "occupation": rng.integers(0, builtin.N_OCCUPATIONS, nu + 1),
        # Arbitrary non-negative int64 ids, as string_id gives MovieLens zip prefixes; hashed by the model.
        "zip_prefix": np.asarray(_mix(zip_codes))[rng.integers(0, len(zip_codes), nu + 1)],
    }
    year = rng.integers(0, builtin.YEAR_BUCKETS, ni + 1)
    # 1-3 distinct genres per item: the first k of a random ordering of the 19 genres, sorted.
    k = rng.integers(1, 4, ni + 1)
    order = np.argsort(rng.random((ni + 1, builtin.N_GENRES)), axis=1)
    keep = np.arange(builtin.N_GENRES)[None, :] < k[:, None]
    chosen = np.sort(np.where(keep, order, builtin.N_GENRES), axis=1)
    offsets = np.zeros(ni + 2, np.int64)
    np.cumsum(k, out=offsets[1:])
    genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(chosen[chosen < builtin.N_GENRES].astype(np.int64)))
    t = Tables(users, items, user_perm, item_perm, U, V, bu, bi, user_attr, year, genres, None, None)
    L = src.history_len
    pool = item_perm[items.sample(rng, (nu + 1) * L)].reshape(nu + 1, L)
    noise = rng.standard_normal(pool.shape, dtype=np.float32)
    ratings = np.empty(pool.shape, np.int8)
    scale = np.float32(1 / np.sqrt(src.rank))
    step = max(1, 2_000_000 // (L * src.rank))  # blocks of users: bounded temporaries
    for lo in range(0, nu + 1, step):
        p = pool[lo:lo + step]
        z = np.einsum("ulr,ur->ul", V[p], U[lo:lo + step]) * scale + bu[lo:lo + step, None] + bi[p]
        ratings[lo:lo + step] = 1 + np.searchsorted(RATING_EDGES, z + np.float32(src.noise) * noise[lo:lo + step])
    t.pool_items, t.pool_ratings = pool, ratings
    if src.long_history is not None:
        _long_history(src, t)
    if src.field_cross is not None:
        _field_cross(src, t)
    return t


def _field_cross(src: SyntheticSource, t: Tables) -> None:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([src.seed, 4])))
    c = rng.standard_normal((builtin.N_OCCUPATIONS, builtin.N_GENRES, 24))
    # ANOVA decomposition: subtracting the mean over each axis in turn leaves the pure three-way part
    for axis in range(3):
        c = c - c.mean(axis=axis, keepdims=True)
    t.cross = (src.field_cross.weight * c / c.std()).astype(np.float32)
    t.first_genre = first_genre(t.genres)


def first_genre(genres: pa.ListArray) -> np.ndarray:
    """Each item's first (smallest) genre id: every item has at least one."""
    return genres.values.to_numpy()[genres.offsets.to_numpy()[:-1]]


def _long_history(src: SyntheticSource, t: Tables) -> None:
    """taste_u: mean of a_i over the older (never shown) pool entries and the visible pool, standardized."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([src.seed, 3])))
    nu, ni = src.n_users, src.n_items
    a = rng.standard_normal(ni + 1, dtype=np.float32)
    c = rng.standard_normal(ni + 1, dtype=np.float32)
    older = src.long_history.pool_len - src.history_len
    total = a[t.pool_items].sum(axis=1, dtype=np.float64)
    step = max(1, 4_000_000 // older)  # blocks of users: bounded temporaries
    for lo in range(0, nu + 1, step):
        n = min(step, nu + 1 - lo)
        total[lo:lo + n] += a[t.item_perm[t.items.sample(rng, n * older)]].reshape(n, older).sum(axis=1, dtype=np.float64)
    mean = total[1:] / src.long_history.pool_len
    taste = np.zeros(nu + 1, np.float32)
    taste[1:] = (mean - mean.mean()) / max(mean.std(), 1e-12)
    t.taste, t.taste_item, t.taste_weight = taste, c, src.long_history.weight


def _mix(x: np.ndarray) -> np.ndarray:
    from recmix.platform.hashing import mix64

    return (mix64(x.astype(np.uint64)) >> np.uint64(1)).astype(np.int64)


def generate_chunk(src: SyntheticSource, t: Tables, chunk: int, lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of the dataset (chunk index `chunk`), every built-in column plus timestamp/user_key."""
    n = hi - lo
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([src.seed, 2, chunk])))
    user = t.user_perm[t.users.sample(rng, n)]
    item = t.item_perm[t.items.sample(rng, n)]
    z = score(t, user, item) + src.noise * rng.standard_normal(n, dtype=np.float32)
    ts = T0 + np.arange(lo, hi, dtype=np.int64)
    if t.cross is not None:
        z = z + t.cross[t.user_attr["occupation"][user], t.first_genre[item], (ts // 3600) % 24]
    L = src.history_len
    lengths = rng.integers(0, L + 1, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Flat pool positions of the last `lengths[r]` pool entries of row r's user.
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - (L - lengths), lengths)
    flat = np.repeat(user.astype(np.int64) * L, lengths) + within
    off = pa.array(offsets)
    cols = {"user_id": user.astype(np.int64)}
    cols.update({k: v[user] for k, v in t.user_attr.items()})
    cols.update({
        "hist_items": pa.ListArray.from_arrays(off, pa.array(t.pool_items.ravel()[flat].astype(np.int64))),
        "hist_ratings": pa.ListArray.from_arrays(off, pa.array(t.pool_ratings.ravel()[flat].astype(np.int64))),
        # no history timestamps here: position k from the end (0 = most recent) is k + 1 minutes old
        "hist_gaps": pa.ListArray.from_arrays(off, pa.array(builtin.gap_bucket(60 * (np.repeat(offsets[1:], lengths) - np.arange(offsets[-1]))))),
        "item_id": item.astype(np.int64), "genres": t.genres.take(pa.array(item)), "year_bucket": t.year[item],
        "hour": (ts // 3600) % 24, "weekday": (ts // 86400 + 3) % 7,
        "label": (z > 0).astype(np.float32), "timestamp": ts, "user_key": user.astype(np.int64),
    })
    return pa.table(cols)


def chunk_ranges(n_rows: int, chunk_rows: int) -> list[tuple[int, int, int]]:
    return [(c, lo, min(lo + chunk_rows, n_rows)) for c, lo in enumerate(range(0, n_rows, chunk_rows))]


def write_chunk(src: SyntheticSource, t: Tables, schema: FeatureSchema, uri: str, store, version: str,
                chunk: int, lo: int, hi: int, bounds: dict) -> list[tuple]:
    """Generate one chunk, check it against the schema, write one file per split it overlaps."""
    from recmix.platform import storage

    from .columns import conform
    from .writer import part_path, write_part

    t0 = time.perf_counter()
    table = conform(generate_chunk(src, t, chunk, lo, hi), schema, f"synthetic chunk {chunk}")
    fs, root = storage.resolve(uri, store)
    out = []
    for split, (a, b) in bounds.items():
        s, e = max(lo, a), min(hi, b)
        if s < e:
            out.append((split, write_part(fs, root, part_path(version, split, chunk), table.slice(s - lo, e - s), schema.labels[0].name)))
    _export(uri, hi - lo, time.perf_counter() - t0)
    return out


_METRICS: dict = {}


def _export(uri: str, rows: int, seconds: float) -> None:
    """rows and rows/s of this chunk (ray.util.metrics; the task's worker exports them), group = dataset name."""
    import ray

    if not ray.is_initialized():
        return
    from recmix.platform.metrics import make

    if not _METRICS:  # once per worker process: Ray keeps one series per name and tags
        _METRICS.update(rows=make("recmix_prepare_rows", component="prepare"),
                        rate=make("recmix_prepare_rows_per_s", component="prepare"))
    tags = {"group": uri.rstrip("/").rsplit("/", 1)[-1] or "dataset"}
    _METRICS["rows"].inc(rows, tags=tags)
    _METRICS["rate"].set(rows / max(seconds, 1e-9), tags=tags)


def generate(src: SyntheticSource, schema: FeatureSchema, fractions, uri: str, store, version: str, cluster_cfg) -> dict:
    """All chunks as Ray tasks on the session cluster (at most one per CPU in flight: bounded memory)."""
    import ray
    from tqdm import tqdm

    from recmix.platform import cluster, storage

    from .columns import arrow_schema, conform
    from .writer import SPLITS, SplitStats, part_path, split_bounds, write_part

    t = build_tables(src)
    conform(generate_chunk(src, t, 0, 0, min(src.n_rows, 1000)), schema, "synthetic source")  # fail before launching
    bounds = split_bounds(src.n_rows, fractions)
    chunks = chunk_ranges(src.n_rows, src.chunk_rows)
    stats = {s: SplitStats() for s in SPLITS}
    with cluster.cluster(cluster_cfg):
        # No credentials travel with the task (a runtime_env is shown by the state API and logged in plain
        # text): workers use their node's own environment or credential chain (platform/secrets.py).
        task = ray.remote(num_cpus=1, max_retries=2)(write_chunk)
        t_ref = ray.put(t)
        window = max(1, int(ray.available_resources().get("CPU", 1)))
        pending, todo = [], list(chunks)
        with tqdm(total=src.n_rows, unit="row", unit_scale=True, desc="synthetic", disable=None) as bar:
            while todo or pending:
                while todo and len(pending) < window:
                    c, lo, hi = todo.pop(0)
                    pending.append(task.remote(src, t_ref, schema, uri, store, version, c, lo, hi, bounds))
                done, pending = ray.wait(pending, num_returns=1)
                for split, part in _get(done[0]):
                    stats[split].add(*part)
                    bar.update(part[1])
    fs, root = storage.resolve(uri, store)
    for split in SPLITS:
        if not stats[split].files:  # an empty split still gets one file carrying the schema
            stats[split].add(*write_part(fs, root, part_path(version, split, 0), arrow_schema(schema).empty_table(), schema.labels[0].name))
    return stats


def _get(ref):
    import ray

    from recmix.platform.errors import RecmixError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RecmixError):
            raise RecmixError(str(e.cause)) from None
        raise
