"""After a short prepare run and a few parameter-server calls, Ray's metrics endpoint serves recmix's metric
names as registered (recmix/platform/metrics.py, docs/operations.md), with their documented tags."""

from __future__ import annotations

import time
import urllib.request
import uuid

import numpy as np
import pytest
import ray

from recmix.platform import metrics

pytestmark = pytest.mark.slow
# Counters that only move under eviction, an admission filter or expiry are not exercised here.
EXPECTED = ["recmix_prepare_rows", "recmix_prepare_rows_per_s", "recmix_ps_rows", "recmix_ps_hit_rate",
            "recmix_ps_admissions", "recmix_ps_latency_s"]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_prepare_and_shards_export_their_documented_metrics(ray_cluster, tmp_path):
    from recmix.actors.group import create_group
    from recmix.jobs.prepare import run
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.embedding import EmbeddingConfig
    from recmix.platform.specs.prepare import PrepareSpec

    spec = PrepareSpec.model_validate({"kind": "prepare", "output": {"uri": str(tmp_path / "scrape-ds")}, "source": {
        "type": "synthetic", "n_rows": 4000, "n_users": 100, "n_items": 50, "history_len": 5, "chunk_rows": 2000}})
    run(spec, ClusterConfig())
    cfg = EmbeddingConfig(name=f"m{uuid.uuid4().hex[:8]}", lmdb_path=str(tmp_path / "lmdb"), ram_rows=64, num_cpus=0.1)
    group = create_group(cfg, {"user": 4}, namespace=f"scrape-{uuid.uuid4().hex[:8]}")
    try:
        client = group.client()
        ids = np.arange(10, dtype=np.int64)
        client.pull({"user": ids})
        client.push({"user": (ids, np.ones((10, 4), np.float32))})
        client.close()

        port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
        wanted = {m: metrics.exported(metrics.BY_NAME[m])[0] for m in EXPECTED}
        deadline, text = time.time() + 45, ""
        while time.time() < deadline:  # export interval ~5-10 s
            text = _scrape(port)
            if all(f"\n{w}{{" in text for w in wanted.values()):
                break
            time.sleep(2)
        missing = [w for w in wanted.values() if f"\n{w}{{" not in text]
        assert not missing, missing
        # the session's cluster is shared: earlier tests' prepares export the same metric with their own group
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_recmix_prepare_rows_total{") and 'group="scrape-ds"' in ln]
        assert lines and 'component="prepare"' in lines[0], [ln for ln in text.splitlines() if "recmix_prepare_rows" in ln][:3]
        ps = [ln for ln in text.splitlines() if ln.startswith("ray_recmix_ps_rows{") and f'group="{cfg.name}"' in ln]
        assert ps and 'component="ps"' in ps[0], [ln for ln in text.splitlines() if ln.startswith("ray_recmix_ps_rows{")][:3]
    finally:
        group.destroy()
