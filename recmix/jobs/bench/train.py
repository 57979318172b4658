"""`recmix bench train`: Ray Train throughput with 1 and 2 workers, the Ray Data feed against a plain pyarrow read,
and parameter-server-backed runs (pass and batch mode) against local tables (same model, same run of the bench).

Every training figure is a real `kind: train` run (Ray Train, one epoch, checkpoints at the epoch end only) of
the quickstart's model without UG-Sep on a synthetic dataset (or `params.dataset`): samples/s is the epoch's
training throughput reported by rank 0 (evaluation excluded). The feed rate is this process reading the
train split into collated batches, through `ray.data.read_parquet(...).iter_batches` (second pass, warm) and
through `pyarrow.parquet.read_table` + the same collate.
Quick: 20,000 rows; full: 100,000 rows.

Parameters (`TrainBenchParams`): `dataset` (a prepared dataset URI; default: synthetic data written to a
temp folder), `batch_size` (global, default 1024).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from recmix.platform.bench import BenchReport
from recmix.platform.specs.bench import TrainBenchParams

MODEL = dict(arch="tokenmixer_large", tokenizer="group_mlp", global_token="mlp", d_model=32, n_heads=4, n_layers=2,
             ffn_mult=2.0)


def _synthetic(root: str, rows: int) -> str:
    from recmix.jobs.prepare import run as prepare
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.prepare import PrepareSpec

    uri = os.path.join(root, "data")
    prepare(PrepareSpec(kind="prepare", output=dict(uri=uri), source=dict(type="synthetic", n_rows=rows, n_users=20_000,
                                                                          n_items=5_000, history_len=20, chunk_rows=rows,
                                                                          seed=0)), ClusterConfig())
    return uri


def _train(uri: str, out: str, workers: int, batch_size: int, embedding: dict | None = None, mode: str = "pass") -> dict:
    from recmix.jobs.train import run
    from recmix.platform.specs.train import TrainSpec

    spec = TrainSpec(kind="train", dataset=dict(uri=uri), model=MODEL, epochs=1, batch_size=batch_size, threads=1,
                     seed=0, output=out, scaling=dict(workers=workers), optimizer=dict(name="adamw", lr=2e-3),
                     embedding=embedding, sparse=dict(mode=mode))
    s = run(spec, log=lambda line: None)
    return {"samples_per_s": s["train_samples_per_s"], "train_s": s["train_seconds"], "test_auc": s["test"]["auc"],
            "wall_s": s["wall_s"]}


def _feed_rates(uri: str, batch_size: int) -> dict:
    import logging

    import pyarrow.parquet as pq
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)   # one INFO block per execution otherwise

    from recmix.jobs.train.data import collate
    from recmix.platform.dataset import open_dataset

    ds = open_dataset(uri)
    files = ds.split_files("train")
    cols = [f.name for f in ds.schema.features]
    rd = ray.data.read_parquet(files, filesystem=ds.filesystem, columns=cols)
    out = {}
    for _ in range(2):   # the second pass is the warm rate
        t0, n = time.perf_counter(), 0
        for t in rd.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            n += collate(t, ds.schema)["labels"].shape[0]
        out["ray_data_rows_per_s"] = n / (time.perf_counter() - t0)
    t0, n = time.perf_counter(), 0
    table = pq.ParquetDataset(files, filesystem=ds.filesystem).read(columns=cols)
    for lo in range(0, table.num_rows, batch_size):
        n += collate(table.slice(lo, batch_size), ds.schema)["labels"].shape[0]
    out["pyarrow_rows_per_s"] = n / (time.perf_counter() - t0)
    out["rows"] = n
    return out


def run(quick: bool, params: TrainBenchParams) -> BenchReport:
    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig

    tmp = tempfile.mkdtemp(prefix="recmix-bench-train-")
    try:
        with cluster.cluster(ClusterConfig(num_cpus=4), include_dashboard=False):
            uri = params.dataset or _synthetic(tmp, 20_000 if quick else 100_000)
            feed = _feed_rates(uri, params.batch_size)
            runs = {f"local, {w} worker{'s' if w > 1 else ''}": _train(uri, os.path.join(tmp, f"w{w}"), w, params.batch_size)
                    for w in (1, 2)}
            for mode in ("pass", "batch"):
                ps = dict(name=f"bench{mode}", shards=2, optimizer={"kind": "rowwise_adagrad", "lr": 0.05})
                runs[f"parameter server ({mode} mode), 1 worker"] = _train(uri, os.path.join(tmp, mode), 1,
                                                                          params.batch_size, ps, mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, two = runs["local, 1 worker"], runs["local, 2 workers"]
    ps_pass, ps_batch = runs["parameter server (pass mode), 1 worker"], runs["parameter server (batch mode), 1 worker"]
    rows = [[k, v["samples_per_s"], v["train_s"], v["test_auc"], v["wall_s"]] for k, v in runs.items()]
    results = {"runs": runs, "feed": feed, "speedup_2_workers": two["samples_per_s"] / one["samples_per_s"],
               "ps_pass_step_time_vs_local": one["samples_per_s"] / ps_pass["samples_per_s"],
               "ps_batch_step_time_vs_local": one["samples_per_s"] / ps_batch["samples_per_s"],
               "ray_data_vs_pyarrow": feed["ray_data_rows_per_s"] / feed["pyarrow_rows_per_s"]}
    notes = [f"feed ({feed['rows']:,} train rows, batches of {params.batch_size} collated by recmix): Ray Data "
             f"{feed['ray_data_rows_per_s']:,.0f} rows/s (warm), pyarrow {feed['pyarrow_rows_per_s']:,.0f} rows/s "
             f"({results['ray_data_vs_pyarrow']:.2f}x)",
             f"2 workers / 1 worker samples/s: {results['speedup_2_workers']:.2f}x; parameter-server step time / local: "
             f"{results['ps_pass_step_time_vs_local']:.2f}x (pass mode), {results['ps_batch_step_time_vs_local']:.2f}x (batch)",
             f"dataset {params.dataset or 'synthetic'}; one epoch per run; global batch {params.batch_size}"]
    return BenchReport(title="train: Ray Train epoch throughput (samples/s) and feed rates",
                       columns=["run", "samples/s", "train s", "test AUC", "wall s"], rows=rows, results=results,
                       config={"model": MODEL, "quick": quick, "batch_size": params.batch_size}, notes=notes)
