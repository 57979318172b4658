"""`kind: pipeline`: run named stages in order on one cluster; a failing stage stops the pipeline."""

from __future__ import annotations

import time
from typing import Any, Callable

from recmix.platform import cluster as ray_cluster
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.job import PipelineSpec


def run(spec: PipelineSpec, cluster: ClusterConfig, *, stage_runner: Callable[[str], Callable[[Any, ClusterConfig], Any]]) -> dict:
    """`stage_runner(kind)` gives a stage's runner; recmix.jobs.registry passes its own (no import back to it)."""
    results = {}
    with ray_cluster.cluster(cluster):
        for stage in spec.stages:
            t0 = time.perf_counter()
            print(f"[pipeline] stage '{stage.name}' ({stage.spec.kind}) ...", flush=True)
            results[stage.name] = stage_runner(stage.spec.kind)(stage.spec, cluster)
            print(f"[pipeline] stage '{stage.name}' done in {time.perf_counter() - t0:.1f}s", flush=True)
    return results
