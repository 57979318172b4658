"""`recmix bench ps`: the embedding parameter server against in-process baselines measured in the same run.

* pull: batches of B ids drawn Zipf(1.05) over N ids, dim 64 fp32, through `PSClient` (dedup, routing,
  one call per shard, reassembly in batch order) with 1, 2 and 4 shards, all rows RAM-resident (warm);
  baseline: `np.take` of the same batches' rows from an in-process table (ids already mapped to rows).
* cold: rows/s a shard promotes from LMDB (every id of a batch only in LMDB; includes the Ray call);
  baseline: raw py-lmdb `getmulti` of the same sorted keys from this process (warm page cache for both).
* push: row-wise Adagrad pushes of (batch ids, gradients) with one shard, against the pull rate.
* scale: R rows (dim 64) through one shard whose RAM tier holds at most C rows: load, then a Zipf
  pull+push workload; hit rates per tier, throughput, and the shard's anonymous resident memory against
  its configured slab budget plus the fixed overhead measured on the empty shard (process + index).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid

import numpy as np

from recmix.platform.bench import BenchReport

DIM = 64


def _zipf_batches(rng, n_ids: int, batch: int, n_batches: int, a: float = 1.05) -> list[np.ndarray]:
    cdf = np.cumsum(np.arange(1, n_ids + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    perm = rng.permutation(n_ids).astype(np.int64)         # hot ids scattered over the id space
    return [perm[np.minimum(np.searchsorted(cdf, rng.random(batch)), n_ids - 1)] for _ in range(n_batches)]


def _cfg(name: str, root: str, shards: int, ram_rows: int, map_size: int, init=None):
    from recmix.platform.specs.embedding import EmbeddingConfig

    return EmbeddingConfig(name=f"{name}{uuid.uuid4().hex[:6]}", lmdb_path=root, shards=shards, ram_rows=ram_rows,
                           map_size=map_size, initializer=init or {"kind": "uniform"})


def _client(cfg):
    from recmix.actors.actor import create_client

    return create_client(cfg, {"t": DIM})


def _close(client) -> None:
    import ray

    for s in client.shards:
        ray.kill(s)


def _rate(fn, items, rows_per_item) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return rows_per_item * len(items) / (time.perf_counter() - t0)


def _pull_and_push(root, batches, shard_counts, res, rows) -> None:
    b = batches[0].shape[0]
    uniq = np.unique(np.concatenate(batches))
    table = np.random.default_rng(1).standard_normal((uniq.shape[0], DIM), dtype=np.float32)
    idx = [np.searchsorted(uniq, x) for x in batches]
    out = np.empty((b, DIM), np.float32)
    base = max(_rate(lambda i: np.take(table, i, axis=0, out=out), idx, b) for _ in range(2))
    res["pull_baseline_rows_s"] = base
    res["unique_per_batch"] = float(np.mean([np.unique(x).shape[0] for x in batches]))
    rows.append(["pull: in-process np.take (baseline)", base, base, 1.0, ""])
    for s in shard_counts:
        client = _client(_cfg("bp", root, s, int(uniq.shape[0] / s * 1.5) + 4 * b, 1 << 32))
        try:
            for x in batches:                                           # warm: create every row
                client.pull({"t": x})
            r = max(_rate(lambda x: client.pull({"t": x}, out={"t": out}), batches, b) for _ in range(2))
            res[f"pull_{s}_shards_rows_s"] = r
            res[f"pull_{s}_shards_ratio"] = r / base
            rows.append([f"pull: client, {s} shard(s)", r, base, r / base, ">= 0.5 (1 shard)" if s == 1 else ""])
            if s == 1:
                rng = np.random.default_rng(2)
                grads = [rng.standard_normal((b, DIM), dtype=np.float32) * 0.01 for _ in batches]
                pairs = list(zip(batches, grads))
                p = _rate(lambda xg: client.push({"t": (xg[0], xg[1])}), pairs, b)
                res["push_adagrad_rows_s"] = p
                res["push_vs_pull"] = p / r
                rows.append(["push: row-wise Adagrad, 1 shard", p, r, p / r, "vs pull"])
        finally:
            _close(client)


def _cold(root, n_rows: int, batch: int, res, rows) -> None:
    import lmdb
    import ray

    from recmix.actors.rows import keys_of, row_dtype

    client = _client(_cfg("bc", root, 1, 2 * batch, 1 << 33))
    try:
        ids = np.random.default_rng(3).permutation(np.arange(n_rows, dtype=np.int64) * 7 + 11)
        for lo in range(0, n_rows, batch):
            client.pull({"t": ids[lo:lo + batch]})
        ray.get(client.shards[0].drop_ram.remote())
        path = ray.get(client.shards[0].info.remote())["path"]
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
        db = env.open_db(b"t", create=False)
        dt = row_dtype(DIM, 1)
        batches = [np.sort(ids[lo:lo + batch]) for lo in range(0, n_rows, batch)]

        def raw(x):
            with env.begin(db=db) as txn:
                return txn.cursor().getmulti(keys_of(x))

        def raw_assembled(x):
            kv = raw(x)
            return np.frombuffer(b"".join(v for _, v in kv), dt)

        raw(batches[0])                                               # warm the page cache
        r_raw = _rate(raw, batches, batch)
        r_asm = _rate(raw_assembled, batches, batch)
        out = np.empty((batch, DIM), np.float32)
        h0 = ray.get(client.shards[0].info.remote())["handler_s"].get("pull", 0.0)
        t0 = time.perf_counter()
        for x in batches:
            client.pull({"t": x}, out={"t": out[:x.shape[0]]})
        wall = time.perf_counter() - t0
        r_ps = n_rows / wall
        res["cold_shard_handler_share"] = (ray.get(client.shards[0].info.remote())["handler_s"]["pull"] - h0) / wall
        c = client.counts()[0]["t"]
        assert c["lmdb_hits"] >= n_rows, c
        env.close()
        res.update(cold_raw_getmulti_rows_s=r_raw, cold_raw_assembled_rows_s=r_asm, cold_promote_rows_s=r_ps,
                   cold_ratio=r_ps / r_raw, cold_ratio_vs_assembled=r_ps / r_asm)
        rows.append(["cold: raw lmdb getmulti (baseline)", r_raw, r_raw, 1.0, ""])
        rows.append(["cold: raw getmulti + ndarray", r_asm, r_raw, r_asm / r_raw, ""])
        rows.append(["cold: shard promotes from LMDB", r_ps, r_raw, r_ps / r_raw, ">= 0.7"])
    finally:
        _close(client)


def _scale(root, n_rows: int, cap: int, batch: int, n_batches: int, res, rows, notes) -> None:
    import ray

    client = _client(_cfg("bs", root, 1, cap, max(1 << 30, n_rows * 700)))
    shard = client.shards[0]
    try:
        empty = ray.get(shard.memory.remote())
        overhead = empty["RssAnon"]
        t0 = time.perf_counter()
        for lo in range(0, n_rows, batch):
            client.pull({"t": np.arange(lo, min(n_rows, lo + batch), dtype=np.int64)})
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(4)
        batches = _zipf_batches(rng, n_rows, batch, n_batches)
        before = client.counts()[0]["t"]
        grads = rng.standard_normal((batch, DIM), dtype=np.float32) * 0.01
        t0 = time.perf_counter()
        for x in batches:
            client.pull({"t": x})
            client.push({"t": (x, grads)})
        work_s = time.perf_counter() - t0
        after = client.counts()[0]["t"]
        mem = ray.get(shard.memory.remote())
        d = {k: after[k] - before[k] for k in ("ram_hits", "lmdb_hits", "misses")}
        seen = max(1, sum(d.values()))
        # Slabs that fill as rows arrive: values, state, pass/time/count/tick, flags. The id slab, free list
        # and hash index are written in full when the shard starts, so they are in the empty-shard overhead.
        slab = cap * (4 * DIM + 4 + 8 * 4 + 1)
        within = (mem["RssAnon"] - overhead) / slab
        res.update(scale_rows=n_rows, scale_ram_rows=cap, scale_load_rows_s=n_rows / load_s,
                   scale_workload_ids_s=2 * batch * n_batches / work_s, scale_ram_hit_rate=d["ram_hits"] / seen,
                   scale_lmdb_hit_rate=d["lmdb_hits"] / seen, scale_rows_ram=after["ram"], scale_rows_lmdb=after["lmdb"],
                   scale_rss_anon_mb=mem["RssAnon"] / 2**20, scale_rss_file_mb=mem["RssFile"] / 2**20,
                   scale_budget_mb=slab / 2**20, scale_overhead_mb=overhead / 2**20, scale_rss_over_budget=within)
        rows.append([f"scale: load {n_rows:,} rows (RAM cap {cap:,})", n_rows / load_s, "", "", ""])
        rows.append(["scale: Zipf pull+push ids/s", 2 * batch * n_batches / work_s, "", "", ""])
        rows.append(["scale: RAM / LMDB hit rate", d["ram_hits"] / seen, d["lmdb_hits"] / seen, "", ""])
        rows.append(["scale: (RssAnon - overhead) / slab budget", within, "", "", "<= 1.2"])
        notes.append(f"scale: slab budget {slab / 2**20:.0f} MB for {cap:,} rows; fixed overhead {overhead / 2**20:.0f} MB "
                     f"(empty shard: process, numpy, Ray, id slab, free list, hash index); RssAnon {mem['RssAnon'] / 2**20:.0f} MB; LMDB pages "
                     f"mapped (RssFile, page cache) {mem['RssFile'] / 2**20:.0f} MB")
        assert after["ram"] <= cap
    finally:
        _close(client)


def run(quick: bool) -> BenchReport:
    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig

    if quick:
        p = dict(n_ids=100_000, batch=8192, n_batches=4, cold_rows=24_576, scale_rows=100_000, scale_cap=16_384, scale_batches=3)
    else:
        p = dict(n_ids=10_000_000, batch=65_536, n_batches=20, cold_rows=300_000, scale_rows=20_000_000,
                 scale_cap=2_000_000, scale_batches=20)
    root = tempfile.mkdtemp(prefix="recmix-bench-ps-")
    res: dict = {}
    rows: list = []
    notes = ["all ratios against baselines measured in this run; the machine is shared, absolute rates are noisy"]
    try:
        with cluster.cluster(ClusterConfig(num_cpus=4), include_dashboard=False):
            batches = _zipf_batches(np.random.default_rng(0), p["n_ids"], p["batch"], p["n_batches"])
            _pull_and_push(root, batches, (1, 2, 4), res, rows)
            _cold(root, p["cold_rows"], p["batch"], res, rows)
            _scale(root, p["scale_rows"], p["scale_cap"], p["batch"], p["scale_batches"], res, rows, notes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BenchReport(title="ps: embedding parameter server (rows/s; ratio vs the same-run baseline)",
                       columns=["measure", "value", "baseline", "ratio", "target"], rows=rows, results=res,
                       config={**p, "dim": DIM, "zipf": 1.05, "optimizer": "rowwise_adagrad"}, notes=notes)
