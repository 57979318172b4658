"""`recmix bench lmn`: LMN memory reads, product keys against a flat search, in-process against the memory shards.

For each N (slots, a perfect square), one batch of Q user-aware queries (d_key 128, d_value 64, k_axis 32,
top_k 32: the `memory:` defaults of storage.md 7.2) is read three ways, timed interleaved in this run:
* product-key, in-process: per-axis top-k over the two sub-key sets, top-K of the k x k sums, softmax, the
  weighted sum of the K value rows gathered from a local (N, 64) tensor;
* product-key, sharded: the same search, the K value rows pulled from the memory shard group (real Ray actors,
  `shards` of them, range-partitioned) through the model's lookup (dedup, one call per shard);
* flat: top-K over all N composite keys [C1_i; C2_j] by brute force (`models.lmn.flat_topk`), then the same
  in-process value read.
The local table holds the shards' values (pulled once), so the in-process and sharded reads are checked equal
before timing. Reported: flat / product-key at the largest N (target >= 20x), growth of the product-key read
from the smallest to the largest N (target <= 8x, sqrt(N) grows 8x from 16K to 1M), sharded / in-process
(target <= 2x), and the memory group's footprint at the largest N (table bytes; shard processes' shared
memory resident, measured).
"""

from __future__ import annotations

import math
import os
import uuid

import numpy as np
import torch

from recmix.platform.bench import BenchReport
from recmix.platform.specs.bench import LmnBenchParams

D_KEY, D_VALUE, K_AXIS, TOP_K = 128, 64, 32, 32
PULL_CHUNK = 1 << 16


def _read(w_QK: torch.Tensor, v_QKV: torch.Tensor) -> torch.Tensor:
    return (w_QK.softmax(-1).unsqueeze(-1) * v_QKV).sum(1)


def _group(n: int, shards: int):
    from recmix.actors.group import create_memory_group
    from recmix.actors.lookup import PSEmbeddingLookup
    from recmix.actors.memory import MemoryShardConfig
    from recmix.models.embedding import TableSpec
    from recmix.models.lmn import VALUE_TABLE

    cfg = MemoryShardConfig(name=f"lmnbench{uuid.uuid4().hex[:6]}", shards=shards, num_cpus=0.5)
    tables = {VALUE_TABLE: TableSpec(VALUE_TABLE, n, D_VALUE, False)}
    group = create_memory_group(cfg, tables, detached=False)
    return group, PSEmbeddingLookup(tables, group.client(), cfg.optimizer)


def _one_size(n: int, p: LmnBenchParams, rounds: int, min_run_time: float, res: dict, rows: list, notes: list,
              footprint: bool) -> None:
    import ray

    from recmix.jobs.bench.timing import time_cases
    from recmix.models.lmn import VALUE_TABLE, composite_keys, flat_topk, product_key_topk

    n_sub = math.isqrt(n)
    g = torch.Generator().manual_seed(n)
    h = D_KEY // 2
    c1, c2 = (torch.randn(n_sub, h, generator=g) / math.sqrt(h) for _ in range(2))
    q = torch.nn.functional.layer_norm(torch.randn(p.queries, D_KEY, generator=g), (D_KEY,))
    q1, q2 = q[:, :h], q[:, h:]
    group, lookup = _group(n, p.shards)
    try:
        values = np.empty((n, D_VALUE), np.float32)             # the shards' values, for the in-process table
        for lo in range(0, n, PULL_CHUNK):
            ids = np.arange(lo, min(n, lo + PULL_CHUNK), dtype=np.int64)
            values[lo:lo + ids.shape[0]] = lookup.client.pull({VALUE_TABLE: ids})[VALUE_TABLE]
        values_NV = torch.from_numpy(values)
        keys_MD = composite_keys(c1, c2)

        def local():
            s, slots = product_key_topk(q1, q2, c1, c2, K_AXIS, TOP_K)
            return _read(s, values_NV[slots])

        def sharded():
            s, slots = product_key_topk(q1, q2, c1, c2, K_AXIS, TOP_K)
            return _read(s, lookup.lookup(VALUE_TABLE, slots))

        def flat():
            s, slots = flat_topk(q, keys_MD, TOP_K)
            return _read(s, values_NV[slots])

        with torch.no_grad():
            a, b = local(), sharded()
            torch.testing.assert_close(a, b, rtol=0, atol=0)       # same rows, same math
            s_f, slots_f = flat_topk(q, keys_MD, TOP_K)
            s_p, slots_p = product_key_topk(q1, q2, c1, c2, K_AXIS, TOP_K)
            torch.testing.assert_close(s_p, s_f, rtol=1e-5, atol=1e-5)   # exact top-K (scores; ties may swap ids)
            t = time_cases({"local": local, "sharded": sharded, "flat": flat}, rounds=rounds,
                           min_run_time=min_run_time, num_threads=p.threads)
        uniq = float(np.unique(slots_p.numpy()).shape[0])
        res[f"n{n}"] = {"local_ms": 1e3 * t["local"], "sharded_ms": 1e3 * t["sharded"], "flat_ms": 1e3 * t["flat"],
                        "flat_over_pk": t["flat"] / t["local"], "sharded_over_local": t["sharded"] / t["local"],
                        "unique_slots": uniq}
        rows.append([n, n_sub, 1e3 * t["local"], 1e3 * t["sharded"], 1e3 * t["flat"], t["flat"] / t["local"],
                     t["sharded"] / t["local"], int(uniq)])
        if footprint:
            mem = ray.get([s.memory.remote() for s in group.handles])
            info = ray.get([s.info.remote() for s in group.handles])
            table = sum(i["bytes"][VALUE_TABLE] for i in info)
            shm = sum(m.get("RssShmem", 0) for m in mem)
            rss = sum(m["VmRSS"] for m in mem)
            files = sum(os.stat(f"{group.root}-{i}-{VALUE_TABLE}").st_blocks * 512 for i in range(p.shards))
            res["footprint"] = {"n": n, "table_mb": table / 2**20, "values_mb": n * D_VALUE * 4 / 2**20,
                                "files_mb": files / 2**20, "shard_rss_shmem_mb": shm / 2**20,
                                "shard_vmrss_mb": rss / 2**20, "shards": p.shards}
            notes.append(f"footprint at N = {n:,} x {D_VALUE}: values {n * D_VALUE * 4 / 2**20:.0f} MiB + row-wise "
                         f"Adagrad state {(table - n * D_VALUE * 4) / 2**20:.0f} MiB = {table / 2**20:.0f} MiB over "
                         f"{p.shards} shards; measured: the shards' /dev/shm files hold {files / 2**20:.0f} MiB "
                         f"of RAM; in the shard processes shared memory resident {shm / 2**20:.0f} MiB (the files "
                         f"and the pull transfer buffers), VmRSS {rss / 2**20:.0f} MiB in all")
    finally:
        lookup.close()
        group.destroy()


def run(quick: bool, params: LmnBenchParams | None = None) -> BenchReport:
    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig

    p = params or LmnBenchParams()
    slots = list(p.slots) if p.slots else ([1024, 4096, 16384] if quick else [16384, 262144, 1048576])
    if quick and p.queries == LmnBenchParams().queries:
        p = p.model_copy(update={"queries": 256})
    for n in slots:
        if math.isqrt(n) ** 2 != n or math.isqrt(n) < K_AXIS:
            raise ValueError(f"params.slots: {n} is not the square of an n_sub >= k_axis ({K_AXIS})")
    rounds, mrt = (2, 0.05) if quick else (4, 0.3)
    torch.set_num_threads(p.threads)
    res: dict = {}
    rows: list = []
    notes = ["times per batch of queries (min over interleaved rounds); ratios against cases of this run"]
    with cluster.cluster(ClusterConfig(num_cpus=4), include_dashboard=False):
        for n in slots:
            _one_size(n, p, rounds, mrt, res, rows, notes, footprint=n == max(slots))
    lo, hi = res[f"n{min(slots)}"], res[f"n{max(slots)}"]
    res["flat_over_pk_at_max"] = hi["flat_over_pk"]
    res["pk_growth"] = hi["local_ms"] / lo["local_ms"]
    res["sharded_over_local_max"] = max(res[f"n{n}"]["sharded_over_local"] for n in slots)
    notes += [f"flat / product-key at N = {max(slots):,}: {hi['flat_over_pk']:.1f}x (target >= 20x)",
              f"product-key read growth N = {min(slots):,} -> {max(slots):,}: {res['pk_growth']:.2f}x "
              f"(target <= 8x; sqrt(N) grows {math.isqrt(max(slots)) / math.isqrt(min(slots)):.0f}x)",
              f"sharded / in-process, worst N: {res['sharded_over_local_max']:.2f}x (target <= 2x)"]
    if quick:
        notes.append("quick shapes: the targets are set for the full run (1,024 queries, N up to 1,048,576); on small "
                     "batches the sharded read's fixed cost per call (dedup, one actor call per shard) dominates")
    return BenchReport(title=f"lmn: memory read of {p.queries} queries (d_key {D_KEY}, d_value {D_VALUE}, k_axis "
                             f"{K_AXIS}, top_k {TOP_K}; ms per batch)",
                       columns=["N", "n_sub", "pk in-process", "pk sharded", "flat", "flat/pk", "sharded/in-proc",
                                "unique slots"],
                       rows=rows, results=res, notes=notes,
                       config={"slots": slots, "queries": p.queries, "shards": p.shards, "threads": p.threads,
                               "d_key": D_KEY, "d_value": D_VALUE, "k_axis": K_AXIS, "top_k": TOP_K})
