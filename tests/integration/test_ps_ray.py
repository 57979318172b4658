"""Embedding parameter server on Ray: router, checkpoints (local and S3) with re-sharding, recovery
after `ray.kill`, and `PSEmbeddingLookup` against a reference computation."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import ray
import torch

from recmix.actors import checkpoint
from recmix.actors.actor import create_client
from recmix.actors.client import PSClient
from recmix.actors.lookup import build_lookup
from recmix.models.embedding import TableSpec
from recmix.platform.errors import RecmixError
from recmix.platform.hashing import shard_of
from recmix.platform.specs.data import StorageConfig
from recmix.platform.specs.embedding import EmbeddingConfig
from tests.unit.test_ps_shard import ref_step, ref_sum

E = 8
DIMS = {"user": E, "item": 4}          # stand-in for the schema's tables
INITS = {"user": {"initializer": {"kind": "normal", "std": 0.1}},
         "item": {"initializer": {"kind": "uniform", "low": -0.1, "high": 0.1}}}


def config(tmp_path, **kw) -> EmbeddingConfig:
    kw.setdefault("tables", INITS)
    kw.setdefault("ram_rows", 256)
    return EmbeddingConfig(name=f"t{uuid.uuid4().hex[:8]}", lmdb_path=str(tmp_path / f"lmdb-{uuid.uuid4().hex[:6]}"), **kw)


def client_for(cfg, dims=DIMS) -> PSClient:
    return create_client(cfg, dims)


def close(client):
    for s in client.shards:
        ray.kill(s)


def snapshot(client, ids_by_table):
    got = client.pull_unique(ids_by_table, with_state=True)
    return {t: (p.ids.copy(), np.array(p.values), np.array(p.state), np.array(p.admitted)) for t, p in got.items()}


def test_router_dedups_routes_and_matches_reference(ray_cluster, tmp_path):
    cfg = config(tmp_path, shards=3)
    client = client_for(cfg)
    try:
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 500, (16, 5))
        rows = client.pull({"user": batch, "item": batch[:, :2]})
        assert rows["user"].shape == (16, 5, E) and rows["item"].shape == (16, 2, 4)
        ref = {i: rows["user"][tuple(np.argwhere(batch == i)[0])] for i in np.unique(batch)}
        assert all(np.array_equal(rows["user"][p], ref[batch[p]]) for p in np.ndindex(batch.shape))
        counts = client.counts()
        assert sum(c["user"]["ram"] for c in counts) == np.unique(batch).shape[0]
        owner = shard_of("user", np.unique(batch), 3)
        assert [c["user"]["ram"] for c in counts] == np.bincount(owner, minlength=3).tolist()
        u = np.unique(batch)
        w, s = np.stack([ref[i] for i in u]).astype(np.float64), np.zeros((u.shape[0], 1))
        for _ in range(3):
            ids = rng.choice(u, 200)
            g = rng.normal(size=(200, E)).astype(np.float32)
            assert client.push({"user": (ids, g)}) == np.unique(ids).shape[0]
            su, sg = ref_sum(ids, g)
            pos = np.searchsorted(u, su)
            w[pos], s[pos] = ref_step("rowwise_adagrad", w[pos], s[pos], sg, 0.05)
        snap = snapshot(client, {"user": u})["user"]
        np.testing.assert_allclose(snap[1], w, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(snap[2], s, rtol=2e-5, atol=2e-6)
        with pytest.raises(ValueError, match="int64"):
            client.pull({"user": batch.astype(np.int32)})
        with pytest.raises(ValueError, match="unknown embedding table"):
            client.push({"nope": (u, np.zeros((u.shape[0], E), np.float32))})
        with pytest.raises(ValueError, match="NaN"):                      # raised by the shard actor
            client.push({"user": (u[:2], np.full((2, E), np.nan, np.float32))})
        assert np.array_equal(snapshot(client, {"user": u})["user"][1], snap[1])
    finally:
        close(client)


def _train_some(client, rng, n=300, users=2000):
    ids = {"user": rng.integers(0, users, n), "item": rng.integers(0, 50, n)}
    client.pull(ids)
    client.push({"user": (ids["user"], rng.normal(size=(n, E)).astype(np.float32)),
                 "item": (ids["item"], rng.normal(size=(n, 4)).astype(np.float32))})
    return ids


def test_checkpoint_restore_onto_other_shard_count(ray_cluster, tmp_path):
    adm = {"policy": "occurrence", "threshold": 2, "filter_slots": 1 << 12}
    cfg = config(tmp_path, shards=3, ram_rows=80, admission=adm)
    client = client_for(cfg)
    rng = np.random.default_rng(1)
    probe = {"user": np.arange(400, dtype=np.int64), "item": np.arange(60, dtype=np.int64)}
    try:
        for _ in range(6):
            _train_some(client, rng, n=120, users=300)
        assert sum(c["user"]["evicted"] for c in client.counts()) > 0    # LMDB holds part of the rows
        ckpt = str(tmp_path / "ckpt")
        m = checkpoint.save(client, ckpt)
        assert m["shards"] == 3 and 0 < m["rows"]["user"] < 300          # occurrence admission left some out
        with pytest.raises(ValueError, match="already exists"):
            checkpoint.save(client, ckpt)
        expect = snapshot(client, probe)
    finally:
        close(client)
    other = client_for(config(tmp_path, shards=2, ram_rows=500, admission=adm))
    try:
        checkpoint.restore(other, ckpt)
        got = snapshot(other, probe)
        for t in probe:
            ids, v, st, ok = expect[t]
            assert np.array_equal(ids, got[t][0])
            # Re-sharded admission filters are summed: they may over-count (admit earlier), never under-count.
            assert got[t][3][ok].all()
            assert np.array_equal(v[ok], got[t][1][ok]) and np.array_equal(st[ok], got[t][2][ok]), t
    finally:
        close(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        checkpoint.restore(other, str(tmp_path / "empty"))


def test_checkpoint_to_s3_and_restart_from_it(ray_cluster, tmp_path, s3_server, s3_bucket):
    ps_bucket = s3_bucket
    cfg = config(tmp_path, shards=2)
    client = client_for(cfg)
    rng = np.random.default_rng(2)
    store = StorageConfig(endpoint_url=s3_server)
    uri = f"s3://{ps_bucket}/ps/ckpt-1"
    try:
        ids = _train_some(client, rng)
        checkpoint.save(client, uri, store)
        expect = snapshot(client, ids)
    finally:
        close(client)
    other = client_for(config(tmp_path, shards=1))
    try:
        checkpoint.restore(other, uri, store)
        got = snapshot(other, ids)
        assert all(np.array_equal(a, b) for t in ids for a, b in zip(expect[t], got[t]))
    finally:
        close(other)
    # A shard that starts with an empty LMDB takes its rows from `restore_from` (node loss, ray.md 12).
    local = str(tmp_path / "ckpt-local")
    src = client_for(config(tmp_path, shards=2))
    try:
        ids = _train_some(src, rng)
        checkpoint.save(src, local)
        expect = snapshot(src, ids)
    finally:
        close(src)
    fresh = client_for(config(tmp_path, shards=3, restore_from=local))
    try:
        assert sum(ray.get(s.info.remote())["restored_rows"] for s in fresh.shards) > 0
        got = snapshot(fresh, ids)
        assert all(np.array_equal(a, b) for t in ids for a, b in zip(expect[t], got[t]))
    finally:
        close(fresh)


def _kill_and_wait(shard):
    old = ray.get(shard.pid.remote())
    ray.kill(shard, no_restart=False)
    deadline = time.time() + 60
    while True:
        try:
            if ray.get(shard.pid.remote(), timeout=10) != old:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.time() < deadline, "shard did not come back"
        time.sleep(0.05)


def test_durable_mode_keeps_every_acknowledged_push(ray_cluster, tmp_path):
    cfg = config(tmp_path, shards=1, durability="write_through", optimizer={"kind": "sgd", "lr": 1.0},
                 initializer={"kind": "zeros"}, tables={})
    client = client_for(cfg, {"user": E})
    shard = client.shards[0]
    try:
        n_batches, per = 40, 25
        ids = np.arange(n_batches * per, dtype=np.int64)
        client.pull({"user": ids})
        refs = []
        for b in range(n_batches):                   # disjoint ids per push: each row tells if its push landed
            sl = ids[b * per:(b + 1) * per]
            refs.append(shard.push.remote({"user": (sl, np.full((per, E), -(b + 1), np.float32))}))
            if b == n_batches // 2:
                old = ray.get(shard.pid.remote())
                ray.kill(shard, no_restart=False)    # asynchronous: later pushes race the restart
        acked = []
        for b, r in enumerate(refs):
            try:
                ray.get(r)
                acked.append(b)
            except ray.exceptions.RayActorError:
                pass
        deadline = time.time() + 60
        while ray.get(shard.pid.remote()) == old:
            assert time.time() < deadline
            time.sleep(0.05)
        assert ray.get(shard.info.remote())["reconstructed"]
        vals = client.pull({"user": ids})["user"].reshape(n_batches, per, E)
        for b in acked:
            assert (vals[b] == b + 1).all(), f"acknowledged push {b} lost"
        for b in set(range(n_batches)) - set(acked):
            assert (vals[b] == 0).all() or (vals[b] == b + 1).all()
        assert len(acked) >= n_batches // 2
    finally:
        close(client)


def test_default_mode_loses_only_pushes_after_the_last_flush(ray_cluster, tmp_path):
    cfg = config(tmp_path, shards=2, optimizer={"kind": "sgd", "lr": 1.0},
                 initializer={"kind": "zeros"}, tables={})
    client = client_for(cfg, {"user": E})
    try:
        ids = np.arange(100, dtype=np.int64)
        client.pull({"user": ids})
        client.push({"user": (ids, np.full((100, E), -1, np.float32))})
        client.end_pass()                            # flushed: survives
        client.push({"user": (ids, np.full((100, E), -1, np.float32))})   # RAM only: lost on a crash
        for s in client.shards:
            _kill_and_wait(s)
        assert [ray.get(s.info.remote())["pass"] for s in client.shards] == [1, 1]
        assert (client.pull({"user": ids})["user"] == 1).all()
    finally:
        close(client)


@pytest.mark.parametrize("mode", ["batch", "pass"])
def test_lookup_forward_and_step_match_reference(ray_cluster, tmp_path, mode):
    cfg = config(tmp_path, shards=2, optimizer={"kind": "rowwise_adagrad", "lr": 0.1})
    tables = {"user": TableSpec("user", 1000, E, True), "item": TableSpec("item", 50, 4, False)}
    lk = build_lookup(cfg, tables, mode=mode)
    try:
        rng = np.random.default_rng(3)
        steps = [torch.from_numpy(rng.integers(0, 40, (6, 3))) for _ in range(3)]
        pass_ids = torch.cat([s.reshape(-1) for s in steps])
        u = np.unique(pass_ids.numpy())
        w0 = lk.client.pull({"user": u})["user"].astype(np.float64)
        w, acc = w0.copy(), np.zeros((u.shape[0], 1))
        if mode == "pass":
            assert lk.begin_pass({"user": pass_ids}) == u.shape[0]
        weight = torch.from_numpy(rng.normal(size=(E,)).astype(np.float32))
        for ids in steps:
            out = lk.lookup("user", ids)
            assert out.shape == (6, 3, E)
            np.testing.assert_allclose(out.detach().numpy(), w[np.searchsorted(u, ids.numpy())], rtol=1e-5, atol=1e-6)
            loss = (out * weight).sum() + (out ** 2).sum()
            loss.backward()
            # reference: d loss / d row = weight + 2 row, summed over the occurrences of each id
            flat = ids.numpy().reshape(-1)
            rows = w[np.searchsorted(u, flat)]
            su, sg = ref_sum(flat, weight.numpy()[None, :].astype(np.float64) + 2 * rows)
            pos = np.searchsorted(u, su)
            w[pos], acc[pos] = ref_step("rowwise_adagrad", w[pos], acc[pos], sg, 0.1)
        lk.end_pass()
        p = lk.client.pull_unique({"user": u}, with_state=True)["user"]
        np.testing.assert_allclose(p.values, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.state, acc, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            assert not lk.lookup("user", steps[0]).requires_grad if mode == "batch" else True
        if mode == "pass":
            with pytest.raises(ValueError, match="not in the open pass"):
                lk.lookup("user", steps[0])
    finally:
        lk.close()
    with pytest.raises(RecmixError, match="embedding.tables: 'item' is not a table of the feature schema"):
        build_lookup(cfg, {"user": tables["user"]})


@pytest.mark.slow
def test_metrics_are_exported(ray_cluster, tmp_path):
    """Shard metrics reach the node's Prometheus endpoint (export lags ~5-10 s, ray.md 7)."""
    import urllib.request

    cfg = config(tmp_path, shards=1, ram_rows=32)
    client = client_for(cfg)
    try:
        client.pull({"user": np.arange(100, dtype=np.int64)})
        client.push({"user": (np.arange(10, dtype=np.int64), np.ones((10, E), np.float32))})
        client.end_pass()
        port = ray.nodes()[0]["MetricsExportPort"]
        want = ("ray_recmix_ps_rows", "ray_recmix_ps_evictions_total", "ray_recmix_ps_latency_s_bucket",
                "ray_recmix_ps_hit_rate", "ray_recmix_ps_admissions_total")
        deadline, text = time.time() + 45, ""
        while time.time() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if all(f"\n{w}{{" in text for w in want):
                break
            time.sleep(1)
        missing = [w for w in want if f"\n{w}{{" not in text]
        assert not missing, missing
        ram = [l for l in text.splitlines() if l.startswith("ray_recmix_ps_rows{") and 'tier="ram"' in l and 'table="user"' in l]
        assert ram and any(float(l.rsplit(" ", 1)[1]) <= 32 for l in ram)
    finally:
        close(client)
