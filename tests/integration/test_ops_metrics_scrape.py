"""After short runs of each component, Ray's metrics endpoint serves recmix's metric names as registered
(recmix/platform/metrics.py, docs/operations.md), with their documented tags: a synthetic and a parquet
prepare, a shard group driven through evictions and expiries, and a Ray Train run."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
import ray

from recmix.platform import metrics

from tests.unit.test_train import tiny_dataset  # noqa: F401  (module fixture: a prepared tiny dataset)

pytestmark = pytest.mark.slow
# The serve metrics are scraped in test_serve_http.py.
EXPECTED = ["recmix_prepare_rows", "recmix_prepare_rows_per_s", "recmix_ps_rows", "recmix_ps_hit_rate",
            "recmix_ps_admissions", "recmix_ps_rejections", "recmix_ps_evictions", "recmix_ps_expiries",
            "recmix_ps_latency_s"]
TRAIN = ["recmix_train_step", "recmix_train_epoch", "recmix_train_loss", "recmix_train_train_loss",
         "recmix_train_samples_per_s", "recmix_train_valid_auc"]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _lines(text: str, metric: str, group: str) -> list[str]:
    name = metrics.exported(metrics.BY_NAME[metric])[0]
    return [ln for ln in text.splitlines() if ln.startswith(name + "{") and f'group="{group}"' in ln]


def _port() -> int:
    return next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])


def test_prepare_and_shards_export_their_documented_metrics(ray_cluster, tmp_path):
    from recmix.actors.group import create_group
    from recmix.jobs.prepare import run
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.embedding import EmbeddingConfig
    from recmix.platform.specs.prepare import PrepareSpec

    from tests.unit.test_prepare_parquet import spec as parquet_spec
    from tests.unit.test_prepare_parquet import write_source

    spec = PrepareSpec.model_validate({"kind": "prepare", "output": {"uri": str(tmp_path / "scrape-ds")}, "source": {
        "type": "synthetic", "n_rows": 4000, "n_users": 100, "n_items": 50, "history_len": 5, "chunk_rows": 2000}})
    run(spec, ClusterConfig())
    write_source(tmp_path / "src", n=2000)   # a parquet source is written by the driver, not by chunk tasks
    run(parquet_spec(tmp_path / "src", tmp_path / "scrape-pq"), ClusterConfig())
    # 2 shards of 16 RAM rows: 40 ids in requests of 10 evict; 3 pass ends expire rows unseen for > 1 pass;
    # an id is admitted on its second pull, so each first pull is a rejection
    cfg = EmbeddingConfig(name=f"m{uuid.uuid4().hex[:8]}", lmdb_path=str(tmp_path / "lmdb"), ram_rows=16, num_cpus=0.1,
                          expiry={"policy": "passes", "after": 1},
                          admission={"policy": "occurrence", "threshold": 2, "filter_slots": 1024})
    group = create_group(cfg, {"user": 4}, namespace=f"scrape-{uuid.uuid4().hex[:8]}")
    try:
        client = group.client()
        for lo in range(0, 40, 10):
            ids = np.arange(lo, lo + 10, dtype=np.int64)
            client.pull({"user": ids})
            client.pull({"user": ids})
            client.push({"user": (ids, np.ones((10, 4), np.float32))})
        expired = sum(a["expired"] for _ in range(3) for a in client.end_pass())
        client.close()
        assert expired > 0

        wanted = {m: metrics.exported(metrics.BY_NAME[m])[0] for m in EXPECTED}
        deadline, text = time.time() + 45, ""
        while time.time() < deadline:  # export interval ~5-10 s
            text = _scrape(_port())
            if all(f"\n{w}{{" in text for w in wanted.values()) and _lines(text, "recmix_prepare_rows_per_s", "scrape-pq"):
                break
            time.sleep(2)
        missing = [w for w in wanted.values() if f"\n{w}{{" not in text]
        assert not missing, missing
        # the session's cluster is shared: earlier tests' prepares export the same metric with their own group
        for ds in ("scrape-ds", "scrape-pq"):
            lines = _lines(text, "recmix_prepare_rows", ds)
            assert lines and 'component="prepare"' in lines[0], [ln for ln in text.splitlines() if "recmix_prepare_rows" in ln][:3]
        assert float(_lines(text, "recmix_prepare_rows", "scrape-pq")[0].rsplit(" ", 1)[1]) == 2000.0
        assert float(_lines(text, "recmix_prepare_rows_per_s", "scrape-pq")[0].rsplit(" ", 1)[1]) > 0
        ps = _lines(text, "recmix_ps_rows", cfg.name)
        assert ps and 'component="ps"' in ps[0], [ln for ln in text.splitlines() if ln.startswith("ray_recmix_ps_rows{")][:3]
        for counter in ("recmix_ps_evictions", "recmix_ps_expiries", "recmix_ps_rejections", "recmix_ps_admissions"):
            values = [float(ln.rsplit(" ", 1)[1]) for ln in _lines(text, counter, cfg.name)]
            assert values and sum(values) > 0, (counter, values)
    finally:
        group.destroy()


def test_a_train_run_exports_its_progress_gauges(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    """The driver exports rank 0's figures and sets them again while the run lives (Ray drops a gauge series
    that is not set for 20 s): seen during the run or in the ~20 s after it. The run is elastic (workers
    [1, 2]) and reports the worker count it ran with."""
    from recmix.jobs.train import run
    from recmix.platform.specs.job import JOB_ADAPTER

    name = f"scrape_{uuid.uuid4().hex[:6]}"
    spec = JOB_ADAPTER.validate_python(dict(
        kind="train", name=name, dataset=dict(uri=str(tiny_dataset)), output=str(tmp_path / "run"), epochs=1,
        batch_size=64, seed=0, threads=1, optimizer=dict(name="adamw", lr=0.01), early_stopping=dict(patience=1),
        model=dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_heads=4, n_layers=2),
        scaling=dict(workers=[1, 2])))
    seen: dict[str, list[str]] = {m: [] for m in TRAIN}
    done, lines = threading.Event(), []

    def poll():
        port = _port()
        while not done.is_set():
            try:
                text = _scrape(port)
            except OSError:
                text = ""
            for m in TRAIN:
                seen[m] += _lines(text, m, name)
            done.wait(2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        summary = run(spec, log=lines.append)
        deadline = time.time() + 30
        while time.time() < deadline and not all(seen.values()):
            time.sleep(1)
    finally:
        done.set()
        t.join(15)
    assert not [m for m, lines in seen.items() if not lines], {m: len(v) for m, v in seen.items()}
    assert all('component="train"' in lines[0] for lines in seen.values())
    steps = [float(ln.rsplit(" ", 1)[1]) for ln in seen["recmix_train_step"]]
    assert 0 < max(steps) <= summary["steps"], (steps, summary["steps"])
    # elastic scaling [1, 2]: the run starts with what the cluster places (2 here, 4 CPUs) and reports it
    assert any(ln.startswith("[train] Ray Train: 1-2 (elastic) worker(s)") for ln in lines), lines
    group = [ln for ln in lines if ln.startswith("[train] worker group: ")]
    assert group and group[0].startswith(f"[train] worker group: {summary['world_size']} rank(s)"), group
    assert summary["world_size"] in (1, 2) and summary["steps"] > 0, summary
