"""Embedding shard (in-process `ShardCore`): optimizers vs numpy, tiers, eviction, admission, expiry,
initializers, input validation. The Ray side (router, checkpoints, recovery, lookup) is test_ps_ray.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from recmix.actors.hashindex import HashIndex
from recmix.actors.layout import ps_layout
from recmix.actors.shard import ShardCore
from recmix.platform.errors import RecmixError
from recmix.platform.specs.embedding import EmbeddingConfig

E = 8


def ref_step(kind: str, w, s, g, lr: float, eps: float = 1e-8, betas=(0.9, 0.999)):
    """Independent float64 numpy reference of one row-wise optimizer step (storage.md 4)."""
    w, s, g = (np.asarray(a, np.float64) for a in (w, s, g))
    if kind == "sgd":
        return w - lr * g, s
    if kind == "rowwise_adagrad":
        acc = s[:, :1] + np.mean(g * g, axis=1, keepdims=True)
        return w - lr * g / (np.sqrt(acc) + eps), acc
    if kind == "adam":
        e = w.shape[1]
        m = betas[0] * s[:, :e] + (1 - betas[0]) * g
        v = betas[1] * s[:, e:2 * e] + (1 - betas[1]) * g * g
        t = s[:, 2 * e:] + 1
        mhat, vhat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        return w - lr * mhat / (np.sqrt(vhat) + eps), np.concatenate([m, v, t], axis=1)
    raise AssertionError(kind)


def ref_sum(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = np.unique(ids)
    out = np.zeros((u.shape[0], grads.shape[1]))
    for j, i in enumerate(u):                       # deliberately the slow obvious way
        out[j] = grads[ids == i].astype(np.float64).sum(axis=0)
    return u, out


TABLES = {"a": (E, {"kind": "normal", "std": 0.1}), "b": (4, {"kind": "zeros"})}


def make(tmp_path, tables=TABLES, shard: int = 0, **kw) -> ShardCore:
    """A shard over {table: (dim, initializer)}: the dims stand in for the schema's, the initializers
    are `embedding.tables` overrides."""
    kw.setdefault("ram_rows", 256)
    cfg = EmbeddingConfig(tables={n: {"initializer": i} for n, (_, i) in tables.items()}, **kw)
    return ShardCore(cfg, ps_layout(cfg, {n: d for n, (d, _) in tables.items()}), shard, str(tmp_path))


def pull(core, table, ids, state=False):
    v, ok, s = core.pull({table: np.asarray(ids, np.int64)}, with_state=state)[table]
    return (v.copy(), ok.copy(), None if s is None else s.copy())


@pytest.mark.parametrize("opt", [{"kind": "sgd", "lr": 0.1}, {"kind": "rowwise_adagrad", "lr": 0.05},
                                 {"kind": "adam", "lr": 0.01, "betas": (0.8, 0.99)}])
def test_pushes_match_numpy_reference(tmp_path, opt):
    core = make(tmp_path, optimizer=opt, ram_rows=64)
    rng = np.random.default_rng(0)
    ids = np.arange(40, dtype=np.int64) * 7919
    w, _, s = pull(core, "a", ids, state=True)
    w, s = w.astype(np.float64), s.astype(np.float64)
    for _ in range(4):
        batch = rng.choice(ids, 60)                 # duplicates: summed before the update
        g = rng.normal(size=(60, E)).astype(np.float32)
        core.push({"a": (batch, g)})
        u, gs = ref_sum(batch, g)
        pos = np.array([np.flatnonzero(ids == i)[0] for i in u])
        w[pos], s[pos] = ref_step(opt["kind"], w[pos], s[pos], gs, opt["lr"], betas=opt.get("betas", (0.9, 0.999)))
        core.pull({"a": rng.integers(10**6, 10**7, 30)})     # churn: rows leave for LMDB and come back
    got_w, ok, got_s = pull(core, "a", ids, state=True)
    assert ok.all()
    np.testing.assert_allclose(got_w, w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_s, s, rtol=2e-5, atol=2e-6)
    assert core.counts()["a"]["evicted"] > 0


def test_duplicate_ids_are_summed_once(tmp_path):
    a, b, c = make(tmp_path / "a"), make(tmp_path / "b"), make(tmp_path / "c")
    ids = np.array([5, 5], np.int64)
    g = np.full((2, E), 0.5, np.float32)
    for core in (a, b, c):
        pull(core, "a", [5])
    a.push({"a": (ids, g)})
    b.push({"a": (ids[:1], g[:1] * 2)})
    c.push({"a": (ids[:1], g[:1])}), c.push({"a": (ids[:1], g[:1])})
    assert np.array_equal(pull(a, "a", [5])[0], pull(b, "a", [5])[0])
    assert not np.allclose(pull(a, "a", [5])[0], pull(c, "a", [5])[0])


def test_row_survives_ram_lmdb_ram_bitwise(tmp_path):
    core = make(tmp_path, optimizer={"kind": "adam"})
    ids = np.array([3, 1 << 40, 2**63 - 1], np.int64)
    pull(core, "a", ids)
    core.push({"a": (ids, np.random.default_rng(1).normal(size=(3, E)).astype(np.float32))})
    before = core.ram["a"].export(core.ram["a"].lookup(ids))
    core.drop_ram()
    assert core.counts()["a"]["ram"] == 0 and core.lmdb.count("a") == 3
    found, stored = core.lmdb.get("a", np.sort(ids))
    assert found.all()
    assert stored.tobytes() == before[np.argsort(ids)].tobytes()       # values, state, meta
    core.pull({"b": np.array([9], np.int64)})
    slots = core.ram["a"].lookup(ids)
    assert (slots < 0).all()
    v, ok, s = pull(core, "a", ids, state=True)
    assert v.tobytes() == before["v"].tobytes() and s.tobytes() == before["s"].tobytes()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_ram_within_budget_and_eviction_policy(tmp_path, policy):
    core = make(tmp_path, ram_rows=100, eviction=policy, evict_to=0.8)
    hot = np.arange(10, dtype=np.int64)
    rng = np.random.default_rng(2)
    for step in range(40):
        core.pull({"a": hot})
        core.pull({"a": rng.integers(1000, 10**6, 30), "b": rng.integers(0, 10**6, 10)})
        assert sum(r.rows for r in core.ram.values()) <= 100
    last = np.arange(10**7, 10**7 + 30, dtype=np.int64)
    core.pull({"a": last})
    assert (core.ram["a"].lookup(last) >= 0).all()            # the newest rows are resident
    for k in range(5):                                        # 150 cold rows, each seen once
        core.pull({"a": np.arange(30, dtype=np.int64) + 2 * 10**7 + 30 * k})
        assert sum(r.rows for r in core.ram.values()) <= 100
    resident = (core.ram["a"].lookup(hot) >= 0).all()
    # LFU keeps the rows seen 40 times; LRU lets them go once 150 newer rows arrived.
    assert resident if policy == "lfu" else not resident
    c = core.counts()
    assert c["a"]["evicted"] + c["b"]["evicted"] > 500


def test_clean_rows_are_never_rewritten(tmp_path):
    core = make(tmp_path, ram_rows=50)
    ids = np.arange(40, dtype=np.int64)
    pull(core, "a", ids)
    assert core.flush() == 40
    writes = core.lmdb.writes
    for k in range(5):                              # evict and promote the same clean rows repeatedly
        pull(core, "a", ids + 1000 * (k + 1))
        pull(core, "a", ids)
    new_rows = 5 * 40                               # only the newly created (dirty) rows get written
    assert core.lmdb.writes - writes <= new_rows
    found, rows = core.lmdb.get("a", ids)
    assert found.all()


def test_occurrence_admission(tmp_path):
    core = make(tmp_path, admission={"policy": "occurrence", "threshold": 3, "filter_slots": 1 << 16})
    ids = np.array([11, 22, 33], np.int64)
    for _ in range(2):
        v, ok, _ = pull(core, "a", ids)
        assert not ok.any() and not v.any()
    assert core.counts()["a"]["ram"] == 0 and core.lmdb.count("a") == 0
    v, ok, _ = pull(core, "a", ids)
    assert ok.all() and v.any()
    assert core.push({"a": (ids, np.ones((3, E), np.float32))}) == 3
    assert not pull(core, "a", [44])[1].any()                 # a new id starts its own count


def test_probability_admission(tmp_path):
    core = make(tmp_path, admission={"policy": "probability", "p": 0.3}, ram_rows=30000)
    _, ok, _ = pull(core, "a", np.arange(20000))
    assert 0.27 < ok.mean() < 0.33
    assert core.counts()["a"]["ram"] == int(ok.sum())
    _, ok2, _ = pull(core, "a", np.arange(20000))
    assert ok2[ok].all() and 0.27 < ok2[~ok].mean() < 0.33     # admitted rows stay; others re-drawn


def test_expiry_by_passes_covers_both_tiers(tmp_path):
    core = make(tmp_path, expiry={"policy": "passes", "after": 2}, ram_rows=64)
    old, kept = np.arange(0, 40, dtype=np.int64), np.arange(100, 110, dtype=np.int64)
    pull(core, "a", old)
    core.end_pass()
    core.drop_ram()                                 # old rows now only in LMDB
    for _ in range(3):
        pull(core, "a", kept)
        core.end_pass()
    assert (core.ram["a"].lookup(old) < 0).all()
    assert not core.lmdb.get("a", old)[0].any()
    assert core.lmdb.get("a", kept)[0].all() and core.counts()["a"]["expired"] == 40


def test_expiry_by_seconds(tmp_path):
    core = make(tmp_path, expiry={"policy": "seconds", "after": 0.3})
    pull(core, "a", [1, 2, 3])
    time.sleep(0.5)
    pull(core, "a", [3])
    assert core.end_pass()["expired"] == 2
    assert core.counts()["a"]["ram"] == 1 and core.lmdb.count("a") == 1


def test_initializers_are_per_table_and_shard_independent(tmp_path):
    tables = {"n": (64, {"kind": "normal", "std": 0.5}), "u": (64, {"kind": "uniform", "low": -0.2, "high": 0.1}),
              "z": (64, {"kind": "zeros"})}
    a = make(tmp_path / "a", tables=tables, ram_rows=4096)
    b = make(tmp_path / "b", tables=tables, shard=3, shards=7, ram_rows=4096)
    ids = np.arange(2000, dtype=np.int64) * 31
    n = pull(a, "n", ids)[0]
    assert abs(n.std() - 0.5) < 0.02 and abs(n.mean()) < 0.02
    u = pull(a, "u", ids)[0]
    assert u.min() >= -0.2 and u.max() <= 0.1 and abs(u.mean() + 0.05) < 0.01
    assert not pull(a, "z", ids)[0].any()
    assert np.array_equal(pull(b, "n", ids[::-1])[0], n[::-1])


@pytest.mark.parametrize("bad", ["dtype", "shape", "grad_shape", "nan", "inf", "table", "negative", "grad_dtype"])
def test_bad_input_raises_and_leaves_shard_unchanged(tmp_path, bad):
    core = make(tmp_path)
    ids = np.arange(8, dtype=np.int64)
    pull(core, "a", ids)
    before = (core.ram["a"].values.copy(), core.ram["a"].state.copy(), core.counts())
    g = np.ones((8, E), np.float32)
    good_b = (np.array([1], np.int64), np.ones((1, 4), np.float32))
    req = {"dtype": {"b": good_b, "a": (ids.astype(np.int32), g)},
           "shape": {"b": good_b, "a": (ids.reshape(2, 4), g)},
           "grad_shape": {"b": good_b, "a": (ids, g[:, :3])},
           "grad_dtype": {"b": good_b, "a": (ids, g.astype(np.float64))},
           "nan": {"b": good_b, "a": (ids, np.where(ids[:, None] == 3, np.nan, g).astype(np.float32))},
           "inf": {"b": good_b, "a": (ids, np.where(ids[:, None] == 3, np.inf, g).astype(np.float32))},
           "table": {"b": good_b, "zz": (ids, g)},
           "negative": {"b": good_b, "a": (ids - 4, g)}}[bad]
    with pytest.raises(ValueError) as e:
        core.push(req)
    assert {"dtype": "int64", "shape": "1-D", "grad_shape": "shape", "grad_dtype": "float32", "nan": "NaN",
            "inf": "NaN or inf", "table": "unknown embedding table 'zz'", "negative": "non-negative"}[bad] in str(e.value)
    if bad in ("dtype", "shape", "table", "negative"):
        with pytest.raises(ValueError):
            core.pull({k: v[0] for k, v in req.items()})
    assert np.array_equal(core.ram["a"].values, before[0]) and np.array_equal(core.ram["a"].state, before[1])
    assert core.counts() == before[2]


def test_request_larger_than_ram_budget_is_served_in_chunks(tmp_path):
    core = make(tmp_path, ram_rows=32, optimizer={"kind": "sgd", "lr": 1.0})
    ids = np.arange(100, dtype=np.int64)
    v, ok, _ = pull(core, "a", ids)
    assert ok.all() and core.counts()["a"]["ram"] <= 32 and core.lmdb.count("a") >= 68
    assert core.push({"a": (ids, np.ones((100, E), np.float32))}) == 100
    assert core.counts()["a"]["ram"] <= 32
    np.testing.assert_array_equal(pull(core, "a", ids)[0], v - 1)


def test_hash_index_against_dict():
    rng = np.random.default_rng(3)
    idx, ref = HashIndex(600), {}
    for _ in range(60):
        new = np.setdiff1d(np.unique(rng.integers(0, 5000, 40)), np.fromiter(ref, np.int64, len(ref)))
        new = new[: max(0, 600 - len(ref))]
        slots = rng.integers(0, 10**6, new.shape[0])
        idx.insert(new, slots)
        ref.update(zip(new.tolist(), slots.tolist()))
        gone = rng.choice(np.fromiter(ref, np.int64, len(ref)), min(len(ref), 25), replace=False)
        got = idx.delete(np.concatenate([gone, [10**9]]))
        assert sorted(got.tolist()) == sorted(ref.pop(k) for k in gone.tolist())
        q = rng.integers(0, 5000, 200)
        assert idx.lookup(q).tolist() == [ref.get(k, -1) for k in q.tolist()]


@pytest.mark.parametrize("bad, msg", [
    ({"shards": 0}, "shards"),
    ({"optimizer": {"kind": "sgd", "lr": 0.1, "betas": [0.9, 0.99]}}, "betas"),
    ({"admission": {"policy": "occurrence", "threshold": 2, "filter_slots": 3000}}, "power of two"),
    ({"tables": [{"name": "a", "dim": 4}]}, "valid dictionary"),          # tables are not declared here
    ({"tables": {"a": {"dim": 4}}}, "tables.a.dim"),                       # dims are the schema's
    ({"tables": {"a": {"initializer": {"kind": "uniform", "low": 0.1, "high": 0.0}}}}, "low < high"),
    ({"initializer": {"kind": "normal", "std": 0}}, "std"),
    ({"mode": "pass"}, "mode"),                                            # a lookup argument, not a server knob
    ({"hbm_rows": 1024}, "hbm_rows"),
    ({"expiry": {"policy": "passes"}}, "after"),
    ({"eviction": "fifo"}, "eviction"),
    ({"ram_rowz": 10}, "ram_rowz"),
])
def test_config_is_strict(bad, msg):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=msg):
        EmbeddingConfig(**bad)


def test_layout_derives_tables_and_rejects_unknown_overrides():
    cfg = EmbeddingConfig(name="ps", shards=3, optimizer={"kind": "adam"}, initializer={"kind": "zeros"},
                          tables={"item_id": {"initializer": {"kind": "uniform"}}})
    lay = ps_layout(cfg, {"user_id": 8, "item_id": 4})
    assert lay.dims == {"user_id": 8, "item_id": 4} and lay.state_widths == {"user_id": 17, "item_id": 9}
    assert lay.tables["user_id"].initializer.kind == "zeros" and lay.tables["item_id"].initializer.kind == "uniform"
    assert lay.shard_names == ("ps-shard-0", "ps-shard-1", "ps-shard-2")
    with pytest.raises(RecmixError, match="embedding.tables: 'item_id' is not a table of the feature schema"):
        ps_layout(cfg, {"user_id": 8})
    with pytest.raises(ValueError, match="unknown embedding table 'b'"):
        lay.check("b")
