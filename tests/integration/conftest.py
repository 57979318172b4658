"""Integration tier: every test here shares the one local Ray cluster of the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """The one Ray cluster of a test session (4 logical CPUs on 2 cores leaves room for Ray Data)."""
    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig

    ctx = cluster.connect(ClusterConfig(num_cpus=4), include_dashboard=False)
    yield ctx
    cluster.shutdown()
