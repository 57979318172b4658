"""MovieLens-100K -> prepared dataset, on the evaluation contract (docs/data.md).

The raw files are found through `source.path`; the examples set it from the RECMIX_ML100K environment
variable (the one documented way to point recmix at a MovieLens-100K copy).

Rows are sorted by (timestamp, user id, item id) and split by position; the history of a row is the
user's last `history_len` items (and ratings, and time-gap buckets to the row) with a timestamp strictly
earlier than the row's, from any split, most recent last. Everything is vectorized with numpy (about a second for the 100k rows).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.hashing import string_id
from recmix.platform.specs.data import StorageConfig
from recmix.platform.specs.prepare import ChecksumPolicy, MovieLensSource

from . import builtin

FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation")
N_USERS, N_ITEMS = 943, 1682
# [choice] user_id train_dropout: 85% of valid (and test) rows belong to users unseen in train; training
# that many rows without the user's id embedding gained valid AUC (docs/models.md).
USER_DROPOUT = 0.85


def read_files(src: MovieLensSource, store: StorageConfig) -> dict[str, bytes]:
    """Read the five input files and verify them against SHA256SUMS per `checksums`."""
    fs, root = storage.resolve(src.path, store)
    missing = [n for n in FILES if fs.get_file_info(storage.join(root, n)).type.name != "File"]
    if missing:
        raise RecmixError(f"source.path: no MovieLens-100K at {src.path} (missing {', '.join(missing)}); "
                          "set RECMIX_ML100K to the folder with u.data, u.user, u.item, u.genre, u.occupation")
    blobs = {name: storage.read_bytes(fs, storage.join(root, name)) for name in FILES}
    if src.checksums is ChecksumPolicy.off:
        return blobs
    sums_path = storage.join(root, "SHA256SUMS")
    if fs.get_file_info(sums_path).type.name != "File":
        if src.checksums is ChecksumPolicy.required:
            raise RecmixError(f"checksums: required but {sums_path} does not exist")
        return blobs
    expected = {}
    for line in storage.read_bytes(fs, sums_path).decode().splitlines():
        parts = line.split()
        if len(parts) == 2:
            expected[parts[1].lstrip("*")] = parts[0].lower()
    for name, data in blobs.items():
        if name not in expected:
            if src.checksums is ChecksumPolicy.required:
                raise RecmixError(f"checksums: {name} is not listed in {sums_path}")
            continue
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected[name]:
            raise RecmixError(f"checksum mismatch for {storage.join(root, name)}: expected sha256 {expected[name]}, "
                              f"got {actual} (corrupted or different download)")
    return blobs


def _csv(data: bytes, names: list[str], delimiter: str, types: dict | None = None) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=types or {}),
    )


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def history(user: np.ndarray, ts: np.ndarray, item: np.ndarray, values: list[np.ndarray], max_len: int):
    """Per row: offsets and flat values of the user's last <= max_len rows with a strictly earlier timestamp.

    Rows are re-sorted by (user, timestamp, item); a row's history ends where its (user, timestamp) tie run
    starts, so ratings in the same second never see each other. Returns (offsets, [flat value arrays]).
    """
    n = len(user)
    perm = np.lexsort((item, ts, user))
    us, tss = user[perm], ts[perm]
    idx = np.arange(n)
    new_user = np.ones(n, bool)
    new_user[1:] = us[1:] != us[:-1]
    new_tie = new_user.copy()
    new_tie[1:] |= tss[1:] != tss[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    tie_start = np.maximum.accumulate(np.where(new_tie, idx, 0))
    end_s = tie_start
    begin_s = np.maximum(user_start, tie_start - max_len)
    pos = np.empty(n, np.int64)
    pos[perm] = idx
    begin, end = begin_s[pos], end_s[pos]
    lengths = end - begin
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, [v[perm][flat] for v in values]


def build_table(blobs: dict[str, bytes], history_len: int) -> pa.Table:
    """All built-in columns plus `timestamp` and `user_key`, rows in contract order."""
    ratings = _csv(blobs["u.data"], ["user", "item", "rating", "ts"], "\t", {k: pa.int64() for k in ("user", "item", "rating", "ts")})
    users = _csv(blobs["u.user"], ["user", "age", "gender", "occupation", "zip"], "|",
                 {"user": pa.int64(), "age": pa.int64(), "zip": pa.string()})
    genre_cols = [f"g{i}" for i in range(builtin.N_GENRES)]
    items = _csv(blobs["u.item"].decode("latin-1").encode(), ["item", "title", "date", "video_date", "url"] + genre_cols, "|",
                 {"item": pa.int64(), "date": pa.string(), **{g: pa.int8() for g in genre_cols}})
    occupations = [l.strip() for l in blobs["u.occupation"].decode().splitlines() if l.strip()]
    n_genres = sum(1 for l in blobs["u.genre"].decode().splitlines() if l.strip())
    if n_genres != builtin.N_GENRES or len(occupations) != builtin.N_OCCUPATIONS:
        raise RecmixError(f"u.genre/u.occupation: expected {builtin.N_GENRES} genres and {builtin.N_OCCUPATIONS} "
                          f"occupations, got {n_genres} and {len(occupations)}")

    # Per-user and per-item attribute tables indexed by id; rows then gather from them.
    uid = _np(users, "user")
    age_t, gender_t, occ_t, zip_t = (np.zeros(N_USERS + 1, np.int64) for _ in range(4))
    age_t[uid] = np.minimum(_np(users, "age") // 10, builtin.AGE_BUCKETS - 1)
    gender_t[uid] = (np.asarray(users.column("gender").to_pylist()) == "M").astype(np.int64)
    occ_index = {name: i for i, name in enumerate(occupations)}
    try:
        occ_t[uid] = [occ_index[o] for o in users.column("occupation").to_pylist()]  # 943 users, once
    except KeyError as e:
        raise RecmixError(f"u.user: occupation {e} is not in u.occupation") from None
    zip_t[uid] = string_id(z[:3] for z in users.column("zip").to_pylist())

    iid = _np(items, "item")
    flags = np.stack([_np(items, g) for g in genre_cols], axis=1).astype(bool)
    year = np.array([float(d[-4:]) if d and d[-4:].isdigit() else np.nan for d in items.column("date").to_pylist()])
    year_t = np.zeros(N_ITEMS + 1, np.int64)
    year_t[iid] = builtin.year_bucket(year)
    genre_rows = np.zeros((N_ITEMS + 1, builtin.N_GENRES), bool)
    genre_rows[iid] = flags
    g_item, g_id = np.nonzero(genre_rows)
    g_off = np.zeros(N_ITEMS + 2, np.int64)
    np.cumsum(np.bincount(g_item, minlength=N_ITEMS + 1), out=g_off[1:])
    genres_by_item = pa.ListArray.from_arrays(pa.array(g_off), pa.array(g_id.astype(np.int64)))

    user, item, rating, ts = (_np(ratings, k) for k in ("user", "item", "rating", "ts"))
    if user.min() < 1 or user.max() > N_USERS or item.min() < 1 or item.max() > N_ITEMS:
        raise RecmixError(f"u.data: user ids must lie in 1..{N_USERS} and item ids in 1..{N_ITEMS}")
    order = np.lexsort((item, user, ts))
    user, item, rating, ts = user[order], item[order], rating[order], ts[order]
    offsets, (h_items, h_ratings, h_ts) = history(user, ts, item, [item, rating, ts], history_len)
    h_gaps = builtin.gap_bucket(np.repeat(ts, np.diff(offsets)) - h_ts)   # strictly earlier: gaps >= 1 s
    off = pa.array(offsets)
    return pa.table({
        "user_id": user, "age_bucket": age_t[user], "gender": gender_t[user], "occupation": occ_t[user],
        "zip_prefix": zip_t[user],
        "hist_items": pa.ListArray.from_arrays(off, pa.array(h_items)),
        "hist_ratings": pa.ListArray.from_arrays(off, pa.array(h_ratings)),
        "hist_gaps": pa.ListArray.from_arrays(off, pa.array(h_gaps)),
        "item_id": item, "genres": genres_by_item.take(pa.array(item)), "year_bucket": year_t[item],
        "hour": (ts // 3600) % 24, "weekday": (ts // 86400 + 3) % 7,  # 1970-01-01 was a Thursday (3)
        "label": (rating >= 4).astype(np.float32),
        "timestamp": ts, "user_key": user,
    })


def schema(src: MovieLensSource):
    return builtin.builtin_schema(N_USERS, N_ITEMS, src.history_len, USER_DROPOUT)
