"""Several workers on one shard group, pushes across shard restarts, pass-mode double buffering: all over
`InProcessShards` (no Ray). A "restart" here is what a Ray restart does to a shard: a new `ShardCore` on the
same LMDB path with an empty RAM tier. The actor-level versions are in tests/integration/test_ps_group.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recmix.actors.backend import InProcessShards, PushError
from recmix.actors.client import PSClient
from recmix.actors.layout import ps_layout
from recmix.actors.lookup import LookupMode, PSEmbeddingLookup, grad_scale_for, run_passes
from recmix.actors.shard import ShardCore
from recmix.models.embedding import TableSpec
from recmix.platform.specs.embedding import EmbeddingConfig

E = 4
TABLES = {"user": TableSpec("user", 1000, E, True)}


class Group:
    """Shard cores shared by any number of clients (the workers of one run)."""

    def __init__(self, root, shards=2, **kw):
        kw.setdefault("initializer", {"kind": "normal", "std": 0.1})
        self.cfg = EmbeddingConfig(name="g", shards=shards, **kw)
        self.layout = ps_layout(self.cfg, {"user": E})
        self.root = str(root)
        self.cores = [ShardCore(self.cfg, self.layout, i, self.root) for i in range(shards)]

    def client(self) -> PSClient:
        backend = InProcessShards([])
        backend.shards = self.cores           # shared list: a restart below is seen by every client
        return PSClient(backend, self.layout)

    def lookup(self, mode="batch", **kw) -> PSEmbeddingLookup:
        return PSEmbeddingLookup(TABLES, self.client(), self.cfg.optimizer, mode=mode, **kw)

    def restart(self, i: int) -> None:
        self.cores[i].lmdb.close()
        self.cores[i] = ShardCore(self.cfg, self.layout, i, self.root)

    def rows(self, ids) -> tuple[np.ndarray, np.ndarray]:
        p = self.client().pull_unique({"user": np.asarray(ids, np.int64)}, with_state=True)["user"]
        return np.array(p.values), np.array(p.state)


def step_loss(rows_BE: torch.Tensor, w_BE: torch.Tensor) -> torch.Tensor:
    """Mean per-example loss whose gradient depends on the rows (so the pull state matters)."""
    return ((rows_BE * w_BE).sum(1) + (rows_BE ** 2).sum(1)).mean()


def global_batch(seed=0, n=32):
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, 20, n))          # many repeats across both halves
    w = torch.from_numpy(rng.normal(size=(n, E)).astype(np.float32))
    return ids, w


def one_worker(group, ids, w, mode="batch"):
    lk = group.lookup(mode)
    if mode == "pass":
        lk.begin_pass({"user": ids})
    step_loss(lk.lookup("user", ids), w).backward()
    lk.end_pass()


def two_workers(group, ids, w, mode="batch", summed=False):
    """Each worker gets half of the global batch, its loss is the mean over its half, grad_scale 1/2."""
    half = ids.shape[0] // 2
    parts = [(ids[:half], w[:half]), (ids[half:], w[half:])]
    if summed:                                              # both halves' gradients in one push
        lks = [group.lookup("batch", grad_scale=grad_scale_for(2)) for _ in parts]
        grads = []
        for lk, (i, ww) in zip(lks, parts):
            lk.client = _Capture(lk.client, grads)
            step_loss(lk.lookup("user", i), ww).backward()
        cat = {"user": (np.concatenate([g[0] for g in grads]), np.concatenate([g[1] for g in grads]))}
        group.client().push(cat)
        return
    lks = [group.lookup(mode, grad_scale=grad_scale_for(2)) for _ in parts]
    if mode == "pass":
        for lk, (i, _) in zip(lks, parts):
            lk.begin_pass({"user": i})
    outs = [lk.lookup("user", i) for lk, (i, _) in zip(lks, parts)]     # both read before either pushes
    for out, (_, ww) in zip(outs, parts):
        step_loss(out, ww).backward()
    for lk in lks:
        lk.end_pass()


class _Capture:
    """A client stand-in that records the pushes of a lookup instead of sending them."""

    def __init__(self, client, into):
        self.inner, self.into = client, into

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push(self, batch, wait=True):
        (ids, g), = batch.values()
        self.into.append((ids, g))
        return []


@pytest.mark.parametrize("mode", ["batch", "pass"])
def test_two_workers_on_halves_equal_one_worker_on_the_batch_sgd(tmp_path, mode):
    ids, w = global_batch()
    u = np.unique(ids.numpy())
    one, two = Group(tmp_path / "one", optimizer={"kind": "sgd", "lr": 0.5}), Group(tmp_path / "two", optimizer={"kind": "sgd", "lr": 0.5})
    before = one.rows(u)[0]
    one_worker(one, ids, w, mode)
    two_workers(two, ids, w, mode)
    np.testing.assert_allclose(two.rows(u)[0], one.rows(u)[0], rtol=1e-6, atol=1e-7)
    assert not np.allclose(one.rows(u)[0], before)
    # Without the scale the two workers' update is twice the global batch's (the check has teeth).
    unscaled = Group(tmp_path / "x", optimizer={"kind": "sgd", "lr": 0.5})
    half = ids.shape[0] // 2
    lks = [unscaled.lookup() for _ in range(2)]
    outs = [lks[0].lookup("user", ids[:half]), lks[1].lookup("user", ids[half:])]
    step_loss(outs[0], w[:half]).backward(), step_loss(outs[1], w[half:]).backward()
    np.testing.assert_allclose(unscaled.rows(u)[0] - before, 2 * (one.rows(u)[0] - before), rtol=1e-4, atol=1e-7)


def test_adagrad_is_exact_when_the_workers_pushes_are_summed_before_the_step(tmp_path):
    ids, w = global_batch(1)
    u = np.unique(ids.numpy())
    opt = {"kind": "rowwise_adagrad", "lr": 0.1}
    one, summed, separate = (Group(tmp_path / n, optimizer=opt) for n in ("one", "summed", "separate"))
    one_worker(one, ids, w)
    two_workers(summed, ids, w, summed=True)
    two_workers(separate, ids, w)
    for a, b in zip(summed.rows(u), one.rows(u)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Two separate pushes run the optimizer twice: the accumulator differs for rows both halves touched.
    assert not np.allclose(separate.rows(u)[1], one.rows(u)[1], rtol=1e-4)


def test_grad_scale_checked():
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        grad_scale_for(0)


def test_write_through_push_after_restart_updates_every_row(tmp_path):
    """The rows a pull created lived only in RAM; after the restart the push re-creates and updates them."""
    g = Group(tmp_path, durability="write_through", optimizer={"kind": "sgd", "lr": 1.0})
    ids = np.arange(50, dtype=np.int64)
    v0 = g.rows(ids)[0]
    g.restart(0), g.restart(1)
    assert g.client().push({"user": (ids, np.ones((50, E), np.float32))}) == 50
    g.restart(0), g.restart(1)                               # acknowledged: durable across a restart
    np.testing.assert_allclose(g.rows(ids)[0], v0 - 1, rtol=1e-6)


def test_retried_request_applies_once_even_after_a_crash_mid_push(tmp_path, monkeypatch):
    g = Group(tmp_path, shards=1, durability="write_through", ram_rows=16, optimizer={"kind": "sgd", "lr": 1.0})
    ids = np.arange(20, dtype=np.int64)                      # 3 chunks of ram_rows / 2
    v0 = g.rows(ids)[0]
    core, calls = g.cores[0], []
    real = core._write

    def crash_on_second_chunk(table, slots, mark=None):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit("killed")                        # the process dies before chunk 2 commits
        real(table, slots, mark)

    monkeypatch.setattr(core, "_write", crash_on_second_chunk)
    grads = np.ones((20, E), np.float32)
    with pytest.raises(SystemExit):
        core.push({"user": (ids, grads)}, "req-1")
    g.restart(0)
    assert g.cores[0].push({"user": (ids, grads)}, "req-1") == 20     # the retry finishes the rest
    assert g.cores[0].push({"user": (ids, grads)}, "req-1") == 20     # a second retry changes nothing
    assert g.cores[0].replayed == 2
    np.testing.assert_allclose(g.rows(ids)[0], v0 - 1, rtol=1e-6)


def test_a_short_count_raises(tmp_path, monkeypatch):
    g = Group(tmp_path)
    c = g.client()
    ids = np.arange(10, dtype=np.int64)
    c.pull({"user": ids})
    monkeypatch.setattr(g.cores[1], "push", lambda req, rid=None: 0)
    with pytest.raises(PushError, match=r"shard 1 updated 0 of \d+") as err:
        c.push({"user": (ids, np.ones((10, E), np.float32))})
    assert [p.shard for p in err.value.pending] == [1]


def test_batch_mode_does_not_push_rows_that_were_not_admitted(tmp_path):
    g = Group(tmp_path, admission={"policy": "occurrence", "threshold": 2, "filter_slots": 1024})
    lk = g.lookup()
    ids = torch.tensor([1, 2, 3])
    out = lk.lookup("user", ids)
    assert not out.detach().any()                            # default rows: not admitted yet
    out.sum().backward()
    assert lk.wait() == 0
    assert sum(c.counts()["user"]["ram"] + c.counts()["user"]["lmdb"] for c in g.cores) == 0


def test_clear_empties_both_tiers(tmp_path):
    g = Group(tmp_path, shards=1, ram_rows=16)
    g.client().pull({"user": np.arange(40, dtype=np.int64)})  # some rows evicted to LMDB
    core = g.cores[0]
    assert core.lmdb.count("user") > 0
    core.clear(pass_id=7)
    assert core.counts()["user"]["ram"] == 0 and core.lmdb.count("user") == 0 and core.pass_id == 7


def passes(seed=3, n_passes=4, steps=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_passes):
        batches = [(torch.from_numpy(rng.integers(0, 30, 8)), torch.from_numpy(rng.normal(size=(8, E)).astype(np.float32)))
                   for _ in range(steps)]
        out.append(({"user": torch.cat([b[0] for b in batches])}, batches))
    return out


def train(lk, plan, prefetch: bool):
    if prefetch:
        for batches in run_passes(lk, plan):
            for ids, w in batches:
                step_loss(lk.lookup("user", ids), w).backward()
        return
    for ids_by_table, batches in plan:
        lk.begin_pass(ids_by_table)
        for ids, w in batches:
            step_loss(lk.lookup("user", ids), w).backward()
        lk.end_pass()


@pytest.mark.parametrize("opt", [{"kind": "rowwise_adagrad", "lr": 0.1}, {"kind": "adam", "lr": 0.01}])
def test_prefetched_passes_train_exactly_like_synchronous_passes(tmp_path, opt):
    """The next pass is pulled before the current one pushes (ids overlap between passes): the patch
    from the current pass's final rows makes the result identical to a pull after the push."""
    sync, pre = Group(tmp_path / "sync", optimizer=opt), Group(tmp_path / "pre", optimizer=opt)
    plan = passes()
    train(sync.lookup("pass"), plan, prefetch=False)
    order = []
    lk = pre.lookup("pass")
    pull, push = lk.client.pull_unique, lk.client.push_deltas
    lk.client.pull_unique = lambda *a, **k: order.append("pull") or pull(*a, **k)
    lk.client.push_deltas = lambda *a, **k: order.append("push") or push(*a, **k)
    train(lk, plan, prefetch=True)
    assert order[:3] == ["pull", "pull", "push"]               # pass 2 was pulled before pass 1 pushed
    u = np.arange(30)
    for a, b in zip(pre.rows(u), sync.rows(u)):
        np.testing.assert_array_equal(a, b)
    assert [c.pass_id for c in pre.cores] == [4, 4]


def test_prefetch_misuse_is_a_clear_error(tmp_path):
    lk = Group(tmp_path).lookup("pass")
    with pytest.raises(ValueError, match="needs a prefetch_pass"):
        lk.begin_pass()
    lk.prefetch_pass({"user": np.array([1], np.int64)})
    with pytest.raises(ValueError, match="already waiting"):
        lk.prefetch_pass({"user": np.array([1], np.int64)})
    with pytest.raises(ValueError, match="without ids"):
        lk.begin_pass({"user": np.array([1], np.int64)})
    assert lk.begin_pass() == 1
    with pytest.raises(ValueError, match="mode 'pass'"):
        Group(tmp_path / "b").lookup(LookupMode.batch).prefetch_pass({"user": np.array([1], np.int64)})


@pytest.mark.parametrize("spec", [dict(arch="dlrm_mlp"), dict(arch="rankmixer", d_model=16, n_tokens=4, n_heads=4),
                                  dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=2),
                                  dict(arch="tokenmixer_large", tokenizer="chunk_per_token", n_tokens=4, d_model=16,
                                       n_heads=4, n_layers=2, ugsep={})])
def test_pass_ids_cover_every_lookup_of_each_architecture(tmp_path, spec):
    """`pass_ids` gives the working set every id the model looks up (UG-Sep's deduplicated users included):
    a lookup outside it would be a ValueError."""
    from pydantic import TypeAdapter

    from recmix.actors.lookup import pass_ids
    from recmix.models.build import build_model
    from recmix.models.embedding import tables_from_schema
    from recmix.models.toy import toy_batch, toy_schema
    from recmix.platform.specs.model import ModelConfig

    schema = toy_schema()
    tables = tables_from_schema(schema)
    cfg = EmbeddingConfig(name="m", shards=2)
    layout = ps_layout(cfg, {t: s.dim for t, s in tables.items()})
    client = PSClient(InProcessShards([ShardCore(cfg, layout, i, str(tmp_path)) for i in range(2)]), layout)
    lk = PSEmbeddingLookup(tables, client, cfg.optimizer, mode="pass")
    model = build_model(TypeAdapter(ModelConfig).validate_python(spec), schema, lk)
    batches = [toy_batch(schema, 8, seed) for seed in range(3)]
    for b in run_passes(lk, [(pass_ids(schema, batches), batches)]):
        for x in b:
            model.loss(model(x), x["labels"])[0].backward()
    assert sum(c.counts()[t]["pushed"] for c in client.backend.shards for t in tables) > 0
