"""`kind: pipeline`: run named stages in order on one cluster; a failing stage stops the pipeline.

At the end one summary line per stage with headline figures (a train stage's test AUC; a serve stage's
sample: latency and the agreement of served with offline scores), and the pipeline's wall time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from recmix.platform import cluster as ray_cluster
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.job import PipelineSpec


def run(spec: PipelineSpec, cluster: ClusterConfig, *, stage_runner: Callable[[str], Callable[[Any, ClusterConfig], Any]],
        log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """`stage_runner(kind)` gives a stage's runner; recmix.jobs.registry passes its own (no import back to it)."""
    results = {}
    t_start = time.perf_counter()
    with ray_cluster.cluster(cluster):
        for stage in spec.stages:
            t0 = time.perf_counter()
            log(f"[pipeline] stage '{stage.name}' ({stage.spec.kind}) ...")
            results[stage.name] = stage_runner(stage.spec.kind)(stage.spec, cluster)
            log(f"[pipeline] stage '{stage.name}' done in {time.perf_counter() - t0:.1f}s")
    for name, res in results.items():
        line = headline(res)
        if line:
            log(f"[pipeline] {name}: {line}")
    log(f"[pipeline] {len(spec.stages)} stage(s) in {time.perf_counter() - t_start:.1f}s")
    return results


def headline(res: Any) -> str:
    """A stage result's figures worth a summary line ('' when none)."""
    if not isinstance(res, dict):
        return ""
    test = res.get("test")
    if isinstance(test, dict) and "auc" in test:
        return f"test AUC {test['auc']:.4f}"
    s = res.get("sample")
    if isinstance(s, dict):
        return (f"{s['ok']}/{s['requests']} sample requests x {s['candidates']} candidates: p50 {s['p50_ms']:.1f} ms, "
                f"p99 {s['p99_ms']:.1f} ms; served vs offline max |diff| {s['max_abs_diff']:.2e} "
                f"({'within' if s['agree'] else 'OVER'} {s['tolerance']:g})")
    return ""
