"""The LMDB tier (T2) of one shard: one environment, one named database per table, a `_meta` database
and a `_reqs` database (push request ids -> progress, so a retried push is applied once, shard.py).

Every access is batched: `getmulti` for reads, one sorted `putmulti` write transaction per flush
(storage.md 2.4, invariant 12). Keys are 8-byte big-endian ids, values packed rows (rows.py). From
CPython LMDB costs ~2 us per key (storage.md 9.2), so it is the cold tier, never the per-batch hot path.
"""

from __future__ import annotations

import os
from operator import itemgetter
from typing import Iterator

import lmdb
import numpy as np

from recmix.actors.rows import ids_of, keys_of, rows_of, values_of

SCAN_CHUNK = 1 << 18
# Keys per getmulti/putmulti call: py-lmdb makes one Python object per key and value; in chunks their
# small-object arenas are reused instead of growing with the request (resident memory, bench "scale").
IO_CHUNK = 8192
_KEY, _VALUE = itemgetter(0), itemgetter(1)


class LmdbTier:
    def __init__(self, path: str, tables: dict[str, np.dtype], map_size: int, sync: bool):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.sync = sync
        self.env = lmdb.open(path, map_size=map_size, max_dbs=len(tables) + 2, sync=sync, metasync=sync,
                             readahead=False)
        self.dtypes = dict(tables)
        self.dbs = {t: self.env.open_db(t.encode()) for t in tables}
        self.meta = self.env.open_db(b"_meta")
        self.reqs = self.env.open_db(b"_reqs")
        self.writes = 0          # rows written, for tests of "clean rows are never rewritten"
        self.write_txns = 0

    def get(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask over ids, rows of the found ids in ids order). ids must be sorted ascending."""
        found = np.zeros(ids.shape[0], bool)
        if ids.shape[0] == 0:
            return found, np.empty(0, self.dtypes[table])
        out = np.empty(ids.shape[0], self.dtypes[table])
        n, keys = 0, []
        with self.env.begin(db=self.dbs[table], buffers=False) as txn:
            cur = txn.cursor()
            for lo in range(0, ids.shape[0], IO_CHUNK):
                sub = ids[lo:lo + IO_CHUNK]
                hits = cur.getmulti(keys_of(sub))
                if not hits:
                    continue
                m = len(hits)
                out[n:n + m] = rows_of(map(_VALUE, hits), out.dtype)     # C-level map: no per-key bytecode
                n += m
                keys.append(sub if m == sub.shape[0] else ids_of(map(_KEY, hits)))
                del hits                                           # free the per-key objects chunk by chunk
        if n:
            found[np.searchsorted(ids, np.concatenate(keys))] = True
        return found, out[:n]

    def put(self, table: str, ids: np.ndarray, rows: np.ndarray, mark: tuple[bytes, bytes] | None = None) -> None:
        """One write transaction, keys in ascending order (sequential in the B-tree). `mark` (request id,
        progress) is written to `_reqs` in the same transaction: rows and progress commit together."""
        if ids.shape[0] == 0 and mark is None:
            return
        order = np.argsort(ids, kind="stable")
        ids, rows = ids[order], rows[order]
        with self.env.begin(write=True, db=self.dbs[table]) as txn:
            cur = txn.cursor()
            for lo in range(0, ids.shape[0], IO_CHUNK):             # one transaction, bounded temporaries
                cur.putmulti(zip(keys_of(ids[lo:lo + IO_CHUNK]), values_of(rows[lo:lo + IO_CHUNK])))
            if mark is not None:
                txn.put(mark[0], mark[1], db=self.reqs)
        self.writes += ids.shape[0]
        self.write_txns += 1

    def get_request(self, rid: bytes) -> bytes | None:
        with self.env.begin(db=self.reqs) as txn:
            return txn.get(rid)

    def prune_requests(self, keep) -> int:
        """Delete request records for which keep(value) is False (periodic, at pass ends)."""
        with self.env.begin(write=True, db=self.reqs) as txn:
            old = [k for k, v in txn.cursor() if not keep(v)]
            for k in old:
                txn.delete(k)
        return len(old)

    def clear(self, table: str) -> None:
        """Remove every row of a table (exact snapshot restores)."""
        with self.env.begin(write=True) as txn:
            txn.drop(self.dbs[table], delete=False)

    def delete(self, table: str, ids: np.ndarray) -> int:
        """Expiry only (periodic): LMDB has no batched delete, so this is one C call per key in one txn."""
        if ids.shape[0] == 0:
            return 0
        with self.env.begin(write=True, db=self.dbs[table]) as txn:
            n = sum(map(txn.delete, keys_of(np.sort(ids))))
        return int(n)

    def count(self, table: str) -> int:
        with self.env.begin(db=self.dbs[table]) as txn:
            return int(txn.stat(self.dbs[table])["entries"])

    def scan(self, table: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All rows of a table in id order, in chunks of SCAN_CHUNK."""
        with self.env.begin(db=self.dbs[table]) as txn:
            it = txn.cursor().iternext(keys=True, values=True)
            while True:
                chunk = [kv for _, kv in zip(range(SCAN_CHUNK), it)]
                if not chunk:
                    return
                ks, vs = zip(*chunk)
                yield ids_of(ks), rows_of(vs, self.dtypes[table])

    def get_meta(self, key: str, default: int) -> int:
        with self.env.begin(db=self.meta) as txn:
            v = txn.get(key.encode())
        return default if v is None else int(v)

    def put_meta(self, key: str, value: int) -> None:
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(key.encode(), str(int(value)).encode())

    def close(self) -> None:
        self.env.close()
