"""`kind: bench`: a benchmark run from a spec (the same code as `recmix bench NAME`)."""

from __future__ import annotations

from recmix.platform.bench import run_bench
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.job import BenchSpec


def run(spec: BenchSpec, cluster: ClusterConfig) -> dict:
    return run_bench(spec.name, quick=spec.quick, out=spec.out)
