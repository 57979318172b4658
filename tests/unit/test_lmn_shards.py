"""LMN memory shards in process (`MemoryCore` behind `PSClient` over `InProcessShards`, no Ray): range
routing, pulls in batch order, row-wise Adagrad against a numpy reference, gradients only on the rows read,
restart from the shared-memory files, re-sharding of dumped rows, bad input, cleanup."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from recmix.actors import optim
from recmix.actors.lookup import PSEmbeddingLookup
from recmix.actors.memory import MemoryCore, MemoryShardConfig, in_process_client, memory_config, memory_layout, \
    release_cores, slab_root
from recmix.actors.rows import init_values
from recmix.models.embedding import TableSpec
from recmix.platform.specs.embedding import EmbeddingConfig

T = "lmn_values"
N, E = 1000, 8


def tables(n=N, e=E):
    return {T: TableSpec(T, n, e, False)}


@pytest.fixture
def client():
    c = in_process_client(MemoryShardConfig(shards=3), tables())
    yield c
    release_cores(c)


def initial(ids, cfg=MemoryShardConfig()):
    return init_values(cfg.initializer, cfg.seed, T, ids, E)


def test_range_layout_routes_contiguous_ranges():
    lay = memory_layout(MemoryShardConfig(shards=3), tables())
    assert lay.bounds(T).tolist() == [0, 333, 666, 1000]
    ids = np.array([0, 332, 333, 665, 666, 999], np.int64)
    assert lay.route(T, ids).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="holds ids 0..999, got 1000"):
        lay.route(T, np.array([5, 1000], np.int64))


def test_pull_batch_order_and_one_sorted_slice_per_shard(client):
    seen = []
    for core in client.backend.shards:
        pull = core.pull
        core.pull = lambda req, ws=False, out=None, _p=pull: (seen.append(req[T].copy()), _p(req, ws, out))[1]
    ids = np.array([[999, 3, 3], [500, 0, 999]], np.int64)
    got = client.pull({T: ids})[T]
    assert got.shape == (2, 3, E)
    np.testing.assert_array_equal(got.reshape(-1, E), initial(ids.reshape(-1)))
    assert [s.tolist() for s in seen] == [[0, 3], [500], [999]]


def test_push_is_rowwise_adagrad_on_summed_duplicates(client):
    cfg = MemoryShardConfig()
    rng = np.random.default_rng(0)
    ids = np.array([7, 400, 7, 999, 400, 7], np.int64)
    before = client.pull({T: np.arange(N, dtype=np.int64)})[T].copy()
    acc = np.zeros((N, 1), np.float32)
    ref = before.astype(np.float64)
    for _ in range(3):
        g = rng.normal(size=(ids.size, E)).astype(np.float32)
        assert client.push({T: (ids, g)}) == 3
        u, inv = np.unique(ids, return_inverse=True)
        gs = np.zeros((u.size, E))
        np.add.at(gs, inv, g)
        acc[u] += (gs * gs).mean(1, keepdims=True)
        ref[u] -= cfg.optimizer.lr * gs / (np.sqrt(acc[u]) + cfg.optimizer.eps)
    after = client.pull({T: np.arange(N, dtype=np.int64)})[T]
    np.testing.assert_allclose(after, ref, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(N), ids)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    st = client.pull_unique({T: np.array([7], np.int64)}, with_state=True)[T].state
    np.testing.assert_allclose(st, acc[[7]], rtol=1e-5)


def test_lookup_gradients_reach_only_the_rows_read():
    c = in_process_client(MemoryShardConfig(shards=2, optimizer={"kind": "sgd", "lr": 1.0}), tables())
    try:
        emb = in_process_client(MemoryShardConfig(name="emb", shards=1), {"item": TableSpec("item", 50, 4, False)})
        lk = PSEmbeddingLookup({"item": TableSpec("item", 50, 4, False)}, emb, emb.backend.shards[0].cfg.optimizer)
        mem = PSEmbeddingLookup(tables(), c, c.backend.shards[0].cfg.optimizer)
        lk.add_group(mem)
        assert set(lk.tables) == {"item", T}
        before = c.pull({T: np.arange(N, dtype=np.int64)})[T].copy()
        slots = torch.tensor([[10, 900], [10, 11]])
        w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        (lk.lookup(T, slots) * w.unsqueeze(-1)).sum().backward()
        lk.wait()
        after = c.pull({T: np.arange(N, dtype=np.int64)})[T]
        expect = before.copy()
        expect[10] -= 4.0
        expect[900] -= 2.0
        expect[11] -= 4.0
        np.testing.assert_allclose(after, expect, atol=1e-6)
        lk.close()
        release_cores(emb)
    finally:
        release_cores(c)


def test_restart_maps_the_same_values_and_pass():
    cfg = MemoryShardConfig(shards=2)
    lay = memory_layout(cfg, tables())
    root = slab_root(cfg)
    core = MemoryCore(cfg, lay, 1, root)
    ids = np.array([600, 601], np.int64)
    core.push({T: (ids, np.ones((2, E), np.float32))})
    core.end_pass()
    want = core.pull({T: ids})[T][0].copy()
    again = MemoryCore(cfg, lay, 1, root)          # what a restarted actor does: same path, no re-init
    assert again.reopened and again.pass_id == 1
    np.testing.assert_array_equal(again.pull({T: ids})[T][0], want)
    assert not np.allclose(want, initial(ids))
    again.release()
    assert not os.path.exists(f"{root}-1-{T}")
    fresh = MemoryCore(cfg, lay, 1, root)          # files gone (another node): initial values
    assert fresh.is_empty()
    np.testing.assert_array_equal(fresh.pull({T: ids})[T][0], initial(ids))
    fresh.release()
    core.release()


def test_dumped_rows_load_onto_another_shard_count(client):
    ids = np.arange(0, N, 7, dtype=np.int64)
    client.push({T: (ids, np.full((ids.size, E), 0.5, np.float32))})
    want = client.pull({T: np.arange(N, dtype=np.int64)})[T].copy()
    dumped = [core.dump(T) for core in client.backend.shards]
    assert sum(d[0].size for d in dumped) == N
    two = in_process_client(MemoryShardConfig(shards=2), tables())
    try:
        for i, rows in dumped:
            dest = two.layout.route(T, i)
            for s in np.unique(dest):
                two.backend.shards[s].load(T, i[dest == s], rows[dest == s])
        np.testing.assert_array_equal(two.pull({T: np.arange(N, dtype=np.int64)})[T], want)
        st = two.pull_unique({T: ids}, with_state=True)[T].state
        assert (st > 0).all()
        with pytest.raises(ValueError, match="shard 0 holds ids 0..499"):
            two.backend.shards[0].load(T, dumped[2][0][:3], dumped[2][1][:3])
    finally:
        release_cores(two)


def test_bad_input_leaves_the_shard_unchanged(client):
    ids = np.array([1, 2], np.int64)
    before = client.pull({T: ids})[T].copy()
    core = client.backend.shards[0]
    with pytest.raises(ValueError, match="out of range"):
        client.pull({T: np.array([1, N], np.int64)})
    with pytest.raises(ValueError, match="holds ids"):
        core.push({T: (np.array([1, 500], np.int64), np.ones((2, E), np.float32))})
    with pytest.raises(ValueError, match="NaN"):
        core.push({T: (ids, np.full((2, E), np.nan, np.float32))})
    with pytest.raises(ValueError, match="shape"):
        core.push({T: (ids, np.ones((2, E + 1), np.float32))})
    with pytest.raises(ValueError, match="unknown embedding table"):
        client.pull({"other": ids})
    np.testing.assert_array_equal(client.pull({T: ids})[T], before)


def test_retried_request_applies_once(client):
    core = client.backend.shards[0]
    ids = np.array([5], np.int64)
    g = np.ones((1, E), np.float32)
    assert core.push({T: (ids, g)}, "req-1") == 1
    once = core.pull({T: ids})[T][0].copy()
    assert core.push({T: (ids, g)}, "req-1") == 1
    np.testing.assert_array_equal(core.pull({T: ids})[T][0], once)
    assert core.replayed == 1


def test_memory_config_follows_the_embedding_section():
    emb = EmbeddingConfig(name="ps", shards=3, optimizer={"kind": "rowwise_adagrad", "lr": 0.2}, seed=5)
    m = memory_config(emb, "rowwise_adagrad")
    assert (m.name, m.shards, m.optimizer.lr, m.seed) == ("ps_memory", 3, 0.2, 5)
    assert memory_config(emb, "sgd").optimizer.lr == 0.05
    assert memory_config(emb, "adam").optimizer.kind == "adam"
    with pytest.raises(ValueError, match="fewer than its 4 shards"):
        memory_layout(MemoryShardConfig(shards=4), tables(n=3))


def test_optimizer_matches_torch_path():
    # the GPU shard runs optim.apply on torch tensors: the same math as the numpy slabs
    cfg = MemoryShardConfig()
    rng = np.random.default_rng(1)
    w, s, g = (rng.normal(size=(4, E)).astype(np.float32), np.zeros((4, 1), np.float32),
               rng.normal(size=(4, E)).astype(np.float32))
    wn, sn = optim.apply(cfg.optimizer, w, s, g)
    wt, st = optim.apply(cfg.optimizer, *(torch.from_numpy(x) for x in (w, s, g)))
    np.testing.assert_allclose(wt.numpy(), wn, rtol=1e-6)
    np.testing.assert_allclose(st.numpy(), sn, rtol=1e-6)


def test_device_arrays_match_the_host_path_and_flush_to_the_files():
    # The GPU branch (num_gpus > 0: torch arrays on the device, written back at pass end) run on a CPU device.
    cfg = MemoryShardConfig(shards=1)
    lay = memory_layout(cfg, tables())
    host = MemoryCore(cfg, lay, 0, slab_root(cfg))
    root = slab_root(cfg)
    dev = MemoryCore(cfg, lay, 0, root)
    dev.device = torch.device("cpu")
    dev._load_device()
    rng = np.random.default_rng(3)
    try:
        for _ in range(2):
            ids = rng.integers(0, N, 50).astype(np.int64)
            g = rng.normal(size=(50, E)).astype(np.float32)
            assert host.push({T: (ids, g)}) == dev.push({T: (ids, g)})
        all_ids = np.arange(N, dtype=np.int64)
        out = np.empty((N, E), np.float32)
        got = dev.pull({T: all_ids}, with_state=True, out={T: out})[T]
        want = host.pull({T: all_ids}, with_state=True)[T]
        assert got[0] is out
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-7)   # float32 torch vs numpy kernels
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
        assert not np.allclose(dev.slabs[T].values, got[0])       # the files lag until the pass ends
        dev.end_pass()
        again = MemoryCore(cfg, lay, 0, root)
        np.testing.assert_array_equal(again.pull({T: all_ids})[T][0], got[0])
        ids, rows = dev.dump(T)
        dev.clear(0)
        dev.load(T, ids, rows)
        np.testing.assert_array_equal(dev.pull({T: all_ids})[T][0], got[0])
        again.release()
    finally:
        host.release()
        dev.release()
