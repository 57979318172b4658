"""`recmix bench datagen`: synthetic prepare throughput and memory against a plain-pyarrow baseline.

* job: the real `kind: prepare` synthetic job (Ray tasks, one per chunk, zstd parquet on local disk),
  timed after the cluster is up; rows/s over all rows.
* baseline: the same table layout (same columns, same list lengths) filled with random int64 by numpy
  and written by pyarrow in this process, with the same compression: the cost of just producing the bytes.
* generator: `synthetic.generate_chunk` alone (no checks, no writes), one process.
* memory: peak RSS (VmHWM) of the driver and of each Ray worker; bounded memory means a worker's peak
  follows `chunk_rows`, not `n_rows`.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmix.platform.bench import BenchReport


def _peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _ray_workers() -> list[int]:
    """Pids of processes named `ray::...` (Ray workers), from /proc; empty where /proc is missing."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read(5) == b"ray::":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _baseline(table: pa.Table, path: str) -> float:
    """Seconds to fill `table`'s layout with random ints (numpy) and write it with pyarrow."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):
            vals = rng.integers(0, 1 << 20, len(col.values))
            cols[name] = pa.ListArray.from_arrays(col.offsets, pa.array(vals))
        else:
            cols[name] = pa.array(rng.integers(0, 1 << 20, len(col)).astype(col.type.to_pandas_dtype()))
    pq.write_table(pa.table(cols), path, compression="zstd", row_group_size=256 * 1024)
    return time.perf_counter() - t0


def run(quick: bool) -> BenchReport:
    import ray

    from recmix.jobs.prepare import run as prepare, synthetic
    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.prepare import PrepareSpec, SyntheticSource

    n_rows, chunk = (600_000, 150_000) if quick else (10_000_000, 1_000_000)
    base_rows = 100_000 if quick else 1_000_000
    cores = os.cpu_count() or 1
    src = {"type": "synthetic", "n_rows": n_rows, "chunk_rows": chunk}
    tmp = tempfile.mkdtemp(prefix="rmx-datagen-")
    try:
        s = SyntheticSource.model_validate(src)
        t0 = time.perf_counter()
        tables = synthetic.build_tables(s)
        t_tables = time.perf_counter() - t0
        t0 = time.perf_counter()
        sample = synthetic.generate_chunk(s, tables, 0, 0, base_rows)
        t_gen = time.perf_counter() - t0
        t_base = _baseline(sample, os.path.join(tmp, "baseline.parquet"))
        del sample, tables

        spec = PrepareSpec.model_validate({"kind": "prepare", "source": src, "output": {"uri": os.path.join(tmp, "ds")}})
        # One logical CPU per core: the job runs at most one chunk task per CPU.
        with cluster.cluster(ClusterConfig(num_cpus=cores), include_dashboard=False):
            ray.get([ray.remote(lambda: None).remote() for _ in range(cores)])  # warm the worker pool
            t0 = time.perf_counter()
            summary = prepare(spec, ClusterConfig(num_cpus=cores))
            t_job = time.perf_counter() - t0
            worker_peaks = [_peak_rss_mb(p) for p in _ray_workers()]
        size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(tmp, "ds")) for f in fs) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    job_rate = n_rows / t_job
    base_rate = base_rows / t_base
    gen_rate = base_rows / t_gen
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_worker = max(worker_peaks, default=0.0)
    rows = [
        ["synthetic prepare job (Ray, all cores)", n_rows, round(t_job, 2), round(job_rate), round(job_rate / base_rate, 3)],
        ["baseline: numpy random ints + pyarrow write, 1 process", base_rows, round(t_base, 2), round(base_rate), 1.0],
        ["generator only (generate_chunk), 1 process", base_rows, round(t_gen, 2), round(gen_rate), round(gen_rate / base_rate, 3)],
    ]
    return BenchReport(
        title=f"datagen: synthetic prepare, {n_rows:,} rows, chunk_rows {chunk:,}, {cores} cores",
        columns=["path", "rows", "seconds", "rows/s", "x baseline"],
        rows=rows,
        results={
            "rows": n_rows, "job_s": round(t_job, 2), "job_rows_per_s": round(job_rate),
            "baseline_rows_per_s": round(base_rate), "job_vs_baseline": round(job_rate / base_rate, 3),
            "generator_rows_per_s": round(gen_rate), "tables_s": round(t_tables, 2),
            "peak_rss_driver_mb": round(driver_mb), "peak_rss_worker_mb": round(peak_worker),
            "workers": len(worker_peaks), "output_mb": round(size_mb), "label_rate_train": summary["splits"]["train"]["label_rate"],
            "extrapolated_10m_s": round(10_000_000 / job_rate, 1),
        },
        config={"n_rows": n_rows, "chunk_rows": chunk, "baseline_rows": base_rows, "compression": "zstd", "cores": cores},
        notes=[f"peak RSS: driver {driver_mb:.0f} MB, largest Ray worker {peak_worker:.0f} MB over {len(worker_peaks)} workers "
               f"(VmHWM); output {size_mb:.0f} MB",
               "the job figure is per core-count of this machine; the baseline runs on one core"],
    )
