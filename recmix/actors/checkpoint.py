"""Checkpoints of all shards to a local folder or an s3:// prefix, restorable onto any shard count.

Layout under the checkpoint URI:
    rows-<shard>-<table>.npz     ids (int64) and rows (the packed row records of rows.py)
    filter-<shard>-<table>.npy   occurrence-admission counters (only with that policy)
    manifest.json                written LAST: hash id, shard count, tables, files, row counts, pass
A checkpoint exists only once its manifest does, so a crash mid-save leaves nothing restorable-looking;
saving onto a URI that already has a manifest is refused. Rows stream through the caller one shard and
table at a time (the caller holds the credentials; shards never need them).
Restore routes every id with `shard_of` (or the id ranges of a range layout, the LMN memory) at the new
shard count (storage.md 5, invariant 6).
"""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np
import ray

from recmix.actors.rows import row_dtype
from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.hashing import HASH_ID
from recmix.platform.specs.data import StorageConfig

FORMAT = "recmix-ps-v1"
LOAD_CHUNK = 1 << 18


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def save(client, uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """Flush and snapshot every shard; returns the manifest."""
    fs, base = storage.resolve(uri, storage_cfg)
    mpath = storage.join(base, "manifest.json")
    if _exists(fs, mpath):
        raise ValueError(f"a checkpoint already exists at {uri} (manifest.json); save to a new URI")
    files, rows = [], {}
    passes = [c["pass"] for c in ray.get([s.info.remote() for s in client.shards])]
    for i, shard in enumerate(client.shards):
        filters = ray.get(shard.admission_state.remote())
        for table in client.dims:
            ids, recs = ray.get(shard.dump.remote(table))
            name = f"rows-{i}-{table}.npz"
            storage.write_bytes_atomic(fs, storage.join(base, name), _npz(ids=ids, rows=recs))
            files.append({"file": name, "shard": i, "table": table, "rows": int(ids.shape[0])})
            rows[table] = rows.get(table, 0) + int(ids.shape[0])
            if table in filters:
                fname = f"filter-{i}-{table}.npy"
                buf = io.BytesIO()
                np.save(buf, filters[table])
                storage.write_bytes_atomic(fs, storage.join(base, fname), buf.getvalue())
                files.append({"file": fname, "shard": i, "table": table, "filter": True})
    manifest = {"format": FORMAT, "hash": HASH_ID, "shards": client.n_shards, "pass": max(passes),
                "tables": {t: {"dim": d, "state": client.swidth[t]} for t, d in client.dims.items()},
                "rows": rows, "files": files, "created": time.time()}
    storage.write_bytes_atomic(fs, mpath, json.dumps(manifest, indent=1).encode())
    return manifest


def _manifest(fs, base: str, uri: str, dims: dict[str, int], swidth: dict[str, int]) -> dict:
    mpath = storage.join(base, "manifest.json")
    if not _exists(fs, mpath):
        raise ValueError(f"no checkpoint at {uri}: manifest.json is missing (incomplete or never written)")
    m = storage.read_json(fs, mpath)
    if not isinstance(m, dict):
        raise RecmixError(f"checkpoint {uri}: manifest.json is not a JSON object")
    if m.get("format") != FORMAT or m.get("hash") != HASH_ID:
        raise ValueError(f"checkpoint {uri} has format {m.get('format')} / hash {m.get('hash')}, "
                         f"expected {FORMAT} / {HASH_ID}")
    for t, spec in m["tables"].items():
        if t in dims and (spec["dim"] != dims[t] or spec["state"] != swidth[t]):
            raise ValueError(f"checkpoint {uri} table '{t}' has dim {spec['dim']} / state {spec['state']}, "
                             f"the shards expect dim {dims[t]} / state {swidth[t]}")
    _check_files(m, uri)
    return m


# The only names `save` writes: a manifest cannot point a restore at any other file (`../x`, `/etc/x`, `a/b`).
_FILE_RE = re.compile(r"^(rows-[0-9]{1,6}-[A-Za-z_][A-Za-z0-9_]{0,63}\.npz|filter-[0-9]{1,6}-[A-Za-z_][A-Za-z0-9_]{0,63}\.npy)$")


def _check_files(m: dict, uri: str) -> None:
    """The manifest is untrusted input: every entry must name a file that `save` could have written, here."""
    files = m.get("files")
    if not isinstance(files, list):
        raise RecmixError(f"checkpoint {uri}: manifest.json 'files' is not a list")
    for f in files:
        name = f.get("file") if isinstance(f, dict) else None
        if not isinstance(name, str) or not _FILE_RE.match(name):
            raise RecmixError(f"checkpoint {uri}: manifest.json names the file {name!r}, which is not a checkpoint "
                              f"file of this folder (rows-<shard>-<table>.npz or filter-<shard>-<table>.npy)")
        kind = "filter" if f.get("filter") else "rows"
        if not name.startswith(f"{kind}-{f.get('shard')}-{f.get('table')}."):
            raise RecmixError(f"checkpoint {uri}: manifest.json entry {name!r} does not match its shard "
                              f"{f.get('shard')!r} / table {f.get('table')!r}")


def _inside(fs, base: str, name: str) -> str:
    """`base/name`, refused when a local symlink takes it out of the checkpoint folder."""
    import os

    import pyarrow.fs as pafs

    path = storage.join(base, name)
    if isinstance(fs, pafs.LocalFileSystem):
        root = os.path.realpath(base)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise RecmixError(f"checkpoint file {path} resolves outside the checkpoint folder {base}")
    return path


def _files(fs, base: str, m: dict, dims: dict):
    for f in m["files"]:
        if f["table"] not in dims:
            continue
        data = io.BytesIO(storage.read_bytes(fs, _inside(fs, base, f["file"])))
        if f.get("filter"):
            yield f["table"], None, np.load(data)
        else:
            z = np.load(data)
            yield f["table"], z["ids"], z["rows"]


def restore(client, uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """Load a checkpoint into the client's shards (any count), re-routing every id by the hash."""
    fs, base = storage.resolve(uri, storage_cfg)
    m = _manifest(fs, base, uri, client.dims, client.swidth)
    refs = []
    for table, ids, recs in _files(fs, base, m, client.dims):
        if ids is None:
            refs += [s.load_admission.remote(table, recs) for s in client.shards]
            continue
        recs = recs.astype(row_dtype(client.dims[table], client.swidth[table]), copy=False)
        for lo in range(0, ids.shape[0], LOAD_CHUNK):
            i, r = ids[lo:lo + LOAD_CHUNK], recs[lo:lo + LOAD_CHUNK]
            dest = client.layout.route(table, i)
            for s in np.unique(dest):
                sel = dest == s
                refs.append(client.shards[s].load.remote(table, i[sel], r[sel]))
        ray.get(refs)
        refs = []
    ray.get(refs)
    return m


def load_into_shard(core, uri: str) -> int:
    """A (re)started shard with an empty LMDB takes its rows from a checkpoint (node loss, ray.md 12)."""
    fs, base = storage.resolve(uri)
    m = _manifest(fs, base, uri, core.dims, core.swidth)
    n = 0
    for table, ids, recs in _files(fs, base, m, core.dims):
        if ids is None:
            core.admission.merge(table, recs)
            continue
        mine = core.layout.route(table, ids) == core.shard_id
        if mine.any():
            n += core.load(table, ids[mine], recs[mine].astype(core.dtypes[table], copy=False))
    return n
