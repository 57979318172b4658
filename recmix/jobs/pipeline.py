"""`kind: pipeline`: run named stages in order on one cluster; a failing stage stops the pipeline."""

from __future__ import annotations

import time

from recmix.platform import cluster as ray_cluster
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.job import PipelineSpec


def run(spec: PipelineSpec, cluster: ClusterConfig) -> dict:
    from recmix.platform.cli import runner

    results = {}
    with ray_cluster.cluster(cluster):
        for stage in spec.stages:
            t0 = time.perf_counter()
            print(f"[pipeline] stage '{stage.name}' ({stage.spec.kind}) ...", flush=True)
            results[stage.name] = runner(stage.spec.kind)(stage.spec, cluster)
            print(f"[pipeline] stage '{stage.name}' done in {time.perf_counter() - t0:.1f}s", flush=True)
    return results
