"""`PSClient` routing, dedup and scatter over in-process shards (`InProcessShards`: `ShardCore`s, no Ray),
and `PSEmbeddingLookup` in batch mode on the same seam. The Ray backend is test_ps_ray.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recmix.actors.backend import InProcessShards
from recmix.actors.client import PSClient
from recmix.actors.layout import ps_layout
from recmix.actors.lookup import PSEmbeddingLookup
from recmix.actors.shard import ShardCore
from recmix.models.embedding import TableSpec
from recmix.platform.hashing import shard_of
from recmix.platform.specs.embedding import EmbeddingConfig, SGDConfig

DIMS = {"user": 8, "item": 4}


class Recording(InProcessShards):
    """Keeps every per-shard request the client sends."""

    def __init__(self, cores):
        super().__init__(cores)
        self.pulls, self.pushes = [], []

    def pull(self, per_shard, with_state):
        self.pulls.append({s: {t: ids.copy() for t, ids in req.items()} for s, req in per_shard.items()})
        return super().pull(per_shard, with_state)

    def push(self, pending):
        self.pushes.append({p.shard: {t: tuple(a.copy() for a in v) for t, v in p.req.items()} for p in pending})
        return super().push(pending)


def client(tmp_path, shards: int = 3, **kw) -> tuple[PSClient, Recording]:
    kw.setdefault("optimizer", {"kind": "sgd", "lr": 1.0})
    cfg = EmbeddingConfig(name="t", shards=shards, ram_rows=4096, initializer={"kind": "normal", "std": 0.1}, **kw)
    layout = ps_layout(cfg, DIMS)
    backend = Recording([ShardCore(cfg, layout, i, str(tmp_path)) for i in range(shards)])
    return PSClient(backend, layout), backend


def stored(core, table) -> np.ndarray:
    ram = core.ram[table]
    return np.sort(ram.ids[ram.used()])


def test_ids_are_routed_by_splitmix64_to_their_shard(tmp_path):
    c, backend = client(tmp_path)
    ids = np.random.default_rng(0).integers(0, 10_000, 3000)
    c.pull({"user": ids, "item": ids[:500]})
    for table, sent in (("user", ids), ("item", ids[:500])):
        u = np.unique(sent)
        owner = shard_of(table, u, 3)
        for s, core in enumerate(backend.shards):
            np.testing.assert_array_equal(stored(core, table), u[owner == s])


def test_repeated_ids_reach_each_shard_once_sorted_in_one_call(tmp_path):
    c, backend = client(tmp_path)
    batch = np.array([[5, 5, 7], [7, 9, 5], [11, 5, 9]], np.int64)
    c.pull({"user": batch, "item": batch[:, :1]})
    assert len(backend.pulls) == 1                    # one call per shard for all tables of the batch
    (req,) = backend.pulls
    for table, sent in (("user", batch), ("item", batch[:, :1])):
        parts = [req[s][table] for s in sorted(req) if table in req[s]]
        assert all(np.array_equal(p, np.unique(p)) for p in parts)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.unique(sent))


def test_rows_are_scattered_back_into_batch_order(tmp_path):
    c, backend = client(tmp_path)
    batch = np.random.default_rng(1).integers(0, 200, (16, 5))
    rows = c.pull({"user": batch})["user"]
    assert rows.shape == (16, 5, 8)
    ref = {}
    for s, core in enumerate(backend.shards):
        for i in stored(core, "user"):
            ref[int(i)] = core.pull({"user": np.array([i], np.int64)})["user"][0][0]
    for p in np.ndindex(batch.shape):
        np.testing.assert_array_equal(rows[p], ref[int(batch[p])])
    assert len({r.tobytes() for r in ref.values()}) == len(ref)     # distinct rows: the check has teeth
    out = np.zeros((16, 5, 8), np.float32)
    assert c.pull({"user": batch}, out={"user": out})["user"] is out and np.array_equal(out, rows)


def test_pushes_are_summed_per_id(tmp_path):
    c, backend = client(tmp_path)
    ids = np.array([3, 8, 3, 3, 21, 8], np.int64)
    before = c.pull({"user": np.unique(ids)})["user"]
    g = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32)
    assert c.push({"user": (ids, g)}) == 3
    for req in backend.pushes[0].values():
        sent, sums = req["user"]
        assert np.array_equal(sent, np.unique(sent))
    after = c.pull({"user": np.unique(ids)})["user"]
    want = np.stack([g[ids == i].sum(0) for i in np.unique(ids)])
    np.testing.assert_allclose(before - after, want, rtol=1e-5, atol=1e-6)       # sgd, lr 1


def test_multi_table_requests_and_errors(tmp_path):
    c, backend = client(tmp_path, shards=2)
    got = c.pull_unique({"user": np.array([1, 2, 1], np.int64), "item": np.array([2, 2], np.int64)})
    assert got["user"].ids.tolist() == [1, 2] and got["user"].inverse.tolist() == [0, 1, 0]
    assert got["item"].ids.tolist() == [2] and got["item"].values.shape == (1, 4)
    # the same id in two tables is two rows (tables are independent)
    assert not np.array_equal(got["user"].values[1, :4], got["item"].values[0])
    assert c.push({"user": (np.array([1], np.int64), np.ones((1, 8), np.float32)),
                   "item": (np.array([2], np.int64), np.ones((1, 4), np.float32))}) == 2
    with pytest.raises(ValueError, match="unknown embedding table 'nope'"):
        c.pull({"nope": np.array([1], np.int64)})
    with pytest.raises(ValueError, match="int64"):
        c.pull({"user": np.array([1], np.int32)})
    with pytest.raises(ValueError, match=r"shape \(1, 8\)"):
        c.push({"user": (np.array([1], np.int64), np.ones((1, 4), np.float32))})
    assert [e["pass"] for e in c.end_pass()] == [1, 1]


def test_lookup_batch_mode_pushes_summed_gradients(tmp_path):
    c, _ = client(tmp_path, shards=2)
    tables = {"user": TableSpec("user", 100, 8, True), "item": TableSpec("item", 50, 4, False)}
    lk = PSEmbeddingLookup(tables, c, SGDConfig(kind="sgd", lr=1.0))
    ids = torch.tensor([[4, 4], [9, 4]])
    before = c.pull({"user": np.array([4, 9], np.int64)})["user"]
    rows = lk.lookup("user", ids)
    assert rows.shape == (2, 2, 8)
    np.testing.assert_array_equal(rows.detach().numpy()[0, 0], before[0])
    (rows * 2.0).sum().backward()
    assert lk.wait() == 2
    after = c.pull({"user": np.array([4, 9], np.int64)})["user"]
    np.testing.assert_allclose(before - after, [[6.0] * 8, [2.0] * 8], rtol=1e-6)   # id 4 three times, id 9 once
    with pytest.raises(ValueError, match="mode 'pass'"):
        lk.begin_pass({"user": np.array([1], np.int64)})
