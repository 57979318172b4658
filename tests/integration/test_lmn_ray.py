"""LMN memory shards as real Ray actors on the session cluster: a killed shard restarts with its values,
a checkpoint restores onto another shard count, workers attach by name, destroy removes the files."""

from __future__ import annotations

import glob
import time
import uuid

import numpy as np
import pytest
import ray
import torch

from recmix.actors import checkpoint
from recmix.actors.group import attach, attach_lookup, create_memory_group
from recmix.actors.memory import MemoryShardConfig
from recmix.models.embedding import TableSpec

from tests.integration.test_ps_ray import _kill_and_wait   # the same actor class: kill by pid, wait for its restart
from tests.unit.test_train import tiny_dataset  # noqa: F401  (module fixture: a prepared tiny dataset)

T = "lmn_values"
N, E = 2000, 8
TABLES = {T: TableSpec(T, N, E, False)}


def test_memory_group_restart_reshard_attach_and_cleanup(ray_cluster, tmp_path):
    ns = f"lmn-test-{uuid.uuid4().hex[:8]}"
    cfg = MemoryShardConfig(name="mem_a", shards=2, optimizer={"kind": "sgd", "lr": 1.0})
    group = create_memory_group(cfg, TABLES, namespace=ns)
    other = None
    try:
        client = attach("mem_a", ns)                       # a worker's view: layout and optimizer from the shards
        assert client.layout.ranges == {T: N}
        all_ids = np.arange(N, dtype=np.int64)
        ids = np.array([3, 999, 1000, 1999, 3], np.int64)
        client.push({T: (ids, np.ones((ids.size, E), np.float32))})
        want = client.pull({T: all_ids})[T].copy()

        _kill_and_wait(group.handles[1])
        info = ray.get(group.handles[1].info.remote())
        assert info["reconstructed"] and info["reopened"]
        np.testing.assert_array_equal(client.pull({T: all_ids})[T], want)   # restarted with its values
        client.push({T: (np.array([1500], np.int64), np.ones((1, E), np.float32))})
        np.testing.assert_allclose(client.pull({T: np.array([1500], np.int64)})[T][0], want[1500] - 1.0)
        want = client.pull({T: all_ids})[T].copy()

        lk = attach_lookup(group.ref, TABLES, mode="batch")   # the model's lookup over the group
        lk.lookup(T, torch.tensor([[7, 8]])).sum().backward()
        lk.close()                                           # waits for the push; the shards keep running
        want[[7, 8]] -= 1.0
        np.testing.assert_allclose(client.pull({T: all_ids})[T], want, atol=1e-6)

        uri = str(tmp_path / "ckpt")
        m = checkpoint.save(client, uri)
        assert m["rows"] == {T: N}
        other = create_memory_group(MemoryShardConfig(name="mem_b", shards=3, optimizer=cfg.optimizer), TABLES, namespace=ns)
        c3 = other.client()
        checkpoint.restore(c3, uri)
        np.testing.assert_array_equal(c3.pull({T: all_ids})[T], want)
        assert [c[T]["ram"] for c in c3.counts()] == [666, 667, 667]
        c3.close()
        client.close()
    finally:
        roots = [g.root for g in (group, other) if g is not None]
        group.destroy()
        if other is not None:
            other.destroy()
    assert not [p for r in roots for p in glob.glob(f"{r}-*")], "destroy left memory files behind"


# --- training: the memory group beside the embedding group ------------------------------------------------------

MEMORY = dict(n_sub=6, d_key=8, d_value=4, k_axis=3, top_k=3, user_features=["user_id"], side_sequences=[],
              lambda_mem=0.5)


def _spec(uri, out, **extra):
    from recmix.platform.specs.job import JOB_ADAPTER

    return JOB_ADAPTER.validate_python(dict(
        kind="train", dataset=dict(uri=uri), output=str(out), epochs=1, batch_size=64, seed=0, threads=1,
        optimizer=dict(name="adamw", lr=0.01), model=dict(arch="tokenmixer_large", tokenizer="group_mlp",
                                                          d_model=16, n_heads=4, n_layers=2, memory=MEMORY),
        embedding=dict(name="lmnps", shards=2, lmdb_path=str(out / "lmdb")), **extra))


def _memory_rows(folder) -> np.ndarray:
    import json

    m = json.loads((folder / "manifest.json").read_text())
    assert m["rows"] == {T: 36} and m["shards"] == 2
    parts = [np.load(folder / f["file"]) for f in m["files"]]
    ids = np.concatenate([p["ids"] for p in parts])
    return np.concatenate([p["rows"]["v"] for p in parts])[np.argsort(ids)]


def _initial_rows() -> np.ndarray:
    from recmix.actors.rows import init_values

    cfg = MemoryShardConfig()
    return init_values(cfg.initializer, cfg.seed, T, np.arange(36, dtype=np.int64), 4)


@pytest.mark.slow
def test_in_process_training_keeps_the_memory_in_its_group(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    from recmix.jobs.train import train
    from recmix.models.lmn import VALUE_TABLE

    res = train(_spec(tiny_dataset, tmp_path / "run"), log=lambda s: None)
    assert VALUE_TABLE in res.model.encoder.lookup.tables           # served by the memory group
    rows = _memory_rows(tmp_path / "run" / "embeddings" / "memory")
    assert not np.allclose(rows, _initial_rows())                    # the values trained
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "lmnps" in str(a)]


@pytest.mark.slow
def test_ray_train_shares_the_memory_group_and_the_artifact_carries_it(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    from recmix.jobs.train import run
    from recmix.jobs.train.score import score
    from recmix.models.artifact import load_artifact
    from recmix.models.lmn import VALUE_TABLE

    out = tmp_path / "run"
    s = _spec(tiny_dataset, out).model_dump(mode="json", exclude_unset=True)
    s.update(scaling={"workers": 2})
    from recmix.platform.specs.job import JOB_ADAPTER

    summary = run(JOB_ADAPTER.validate_python(s), log=lambda line: None)
    version = out / "artifact" / (out / "artifact" / "LATEST").read_text().strip()
    rows = _memory_rows(version / "embeddings" / "memory")
    assert not np.allclose(rows, _initial_rows())
    model = load_artifact(str(out / "artifact"))                     # no shard group is running any more
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "lmnps" in str(a)]
    got = model.encoder.lookup.lookup(VALUE_TABLE, torch.arange(36))
    np.testing.assert_array_equal(got.numpy(), rows)
    res = score(str(out / "artifact"), str(tiny_dataset), echo=lambda line: None)
    assert abs(res["auc"] - summary["test"]["auc"]) < 1e-6, (res, summary["test"])
    cks = sorted((out / "checkpoints" / "train").glob("checkpoint-*"))
    assert cks and all((c / "ps" / "memory" / "snapshot.json").exists() for c in cks)


def test_bench_lmn_runs_on_small_shapes(ray_cluster):
    from recmix.jobs.bench import lmn
    from recmix.platform.specs.bench import LmnBenchParams

    rep = lmn.run(True, LmnBenchParams(slots=[1024, 4096], queries=16))
    assert [r[0] for r in rep.rows] == [1024, 4096]
    r = rep.results
    assert r["n4096"]["flat_ms"] > 0 and r["footprint"]["n"] == 4096 and r["footprint"]["values_mb"] == 1.0
    assert set(r) >= {"flat_over_pk_at_max", "pk_growth", "sharded_over_local_max"}


def test_memory_shards_export_metrics_tagged_by_their_group(ray_cluster):
    """The memory group's series carry its own group name, so they never collide with an embedding group's."""
    import urllib.request

    ns = f"lmn-metrics-{uuid.uuid4().hex[:8]}"
    name = f"mem_{uuid.uuid4().hex[:6]}"
    group = create_memory_group(MemoryShardConfig(name=name, shards=2, optimizer={"kind": "sgd", "lr": 1.0}), TABLES,
                                namespace=ns)
    try:
        client = group.client()
        port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
        found: dict[str, list[str]] = {}
        deadline = time.time() + 60
        while time.time() < deadline:
            ids = np.arange(0, N, 7, dtype=np.int64)
            client.pull({T: ids})
            client.push({T: (ids, np.ones((ids.size, E), np.float32))})
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            found = {m: [ln for ln in text.splitlines() if ln.startswith(m + "{") and f'group="{name}"' in ln]
                     for m in ("ray_recmix_ps_rows", "ray_recmix_ps_latency_s_count")}
            if all(found.values()):
                break
            time.sleep(2)
        client.close()
        assert all(found.values()), found
        shards = {ln.split('shard="')[1].split('"')[0] for ln in found["ray_recmix_ps_rows"]}
        assert shards == {"0", "1"} and all('component="ps"' in ln for ln in found["ray_recmix_ps_rows"]), found
    finally:
        group.destroy()
