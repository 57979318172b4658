"""LMN product-key memory: exact top-K, gradients, memory loss, UG-Sep purity, training (spec storage.md §7)."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from recmix.models.build import build_model
from recmix.models.embedding import LocalEmbeddingLookup, tables_from_schema
from recmix.models.lmn import VALUE_TABLE, MemoryReadout, composite_keys, flat_topk, memory_tables, product_key_topk
from recmix.models.toy import toy_batch, toy_schema
from recmix.platform.specs.memory import MemoryConfig
from recmix.platform.specs.model import ModelConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and on a busy 2-core machine many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_sub,k_axis,top_k", [(8, 4, 4), (16, 8, 5), (7, 7, 49), (5, 3, 9)])
def test_product_keys_equal_brute_force(n_sub, k_axis, top_k):
    g = torch.Generator().manual_seed(n_sub * 100 + top_k)
    Q, H = 33, 6
    q_QD = torch.randn(Q, 2 * H, generator=g, dtype=torch.float64)
    c1, c2 = (torch.randn(n_sub, H, generator=g, dtype=torch.float64) for _ in range(2))
    s_pk, slots_pk = product_key_topk(q_QD[:, :H], q_QD[:, H:], c1, c2, k_axis, top_k)
    s_fl, slots_fl = flat_topk(q_QD, composite_keys(c1, c2), top_k, chunk=10)   # chunks exercise the merge
    # brute force in the most literal form: every composite key, one score each
    full = q_QD @ composite_keys(c1, c2).T
    s_bf, slots_bf = full.topk(top_k, dim=-1)
    if top_k <= k_axis or k_axis == n_sub:   # the exactness guarantee
        assert torch.equal(slots_pk.sort(-1).values, slots_bf.sort(-1).values)
        torch.testing.assert_close(s_pk, s_bf)
    assert torch.equal(slots_fl.sort(-1).values, slots_bf.sort(-1).values)
    torch.testing.assert_close(s_fl, s_bf)
    # the slots' own scores recomputed from their ids: slot = i * n_sub + j
    i, j = slots_pk // n_sub, slots_pk % n_sub
    torch.testing.assert_close(s_pk, (q_QD[:, None, :H] * c1[i]).sum(-1) + (q_QD[:, None, H:] * c2[j]).sum(-1))


def test_product_keys_batch_over_heads():
    g = torch.Generator().manual_seed(1)
    h, Q, N, H = 3, 10, 9, 4
    q1, q2 = torch.randn(h, Q, H, generator=g), torch.randn(h, Q, H, generator=g)
    c1, c2 = torch.randn(h, N, H, generator=g), torch.randn(h, N, H, generator=g)
    s, slots = product_key_topk(q1, q2, c1, c2, 4, 4)
    assert s.shape == slots.shape == (h, Q, 4)
    for e in range(h):
        s_e, slots_e = product_key_topk(q1[e], q2[e], c1[e], c2[e], 4, 4)
        assert torch.equal(slots[e], slots_e)
        torch.testing.assert_close(s[e], s_e)


# ---- the layer on the toy schema (history group user-side; no side sequence there) ------------------


TINY = dict(n_sub=6, d_key=8, d_value=4, k_axis=3, top_k=3, user_features=["user_id", "zip_prefix"], side_sequences=[])


def _setup(**kw):
    torch.manual_seed(0)
    schema = toy_schema()
    cfg = MemoryConfig(**{**TINY, **kw})
    lookup = LocalEmbeddingLookup({**tables_from_schema(schema), **memory_tables(type("M", (), {"memory": cfg}))}, 0.1)
    return schema, cfg, lookup, MemoryReadout(cfg, schema)


def test_readout_equals_brute_force_reads():
    schema, cfg, lookup, ro = _setup(heads=2)
    batch = toy_batch(schema, 16, seed=3)
    out_BV = ro(batch, lookup)
    assert out_BV.shape == (16, cfg.d_value) and ro.width == cfg.d_value and ro.group == "history"
    # recompute every read by brute force over all composite keys of each head
    V = lookup.emb[VALUE_TABLE].weight
    ids = batch["hist_items"]
    for b in range(16):
        reads = []
        for s in range(ids.shape[1]):
            if ids[b, s] < 0:
                continue
            e_b = lookup.lookup("item_id", ids[b, s:s + 1])
            e_u = torch.cat([lookup.lookup("user_id", batch["user_id"][b:b + 1]),
                             lookup.lookup("zip_prefix", batch["zip_prefix"][b:b + 1])], -1)
            q_AQD = ro.memory.query(torch.cat([e_b, e_u], -1))
            m = 0
            for a in range(cfg.heads):
                scores = q_AQD[a] @ composite_keys(ro.memory.c1_ANH[a], ro.memory.c2_ANH[a]).T
                top, slots = scores.topk(cfg.top_k, -1)
                m = m + (top.softmax(-1).unsqueeze(-1) * V[slots]).sum(1)
            reads.append(m)
        want = torch.cat(reads).mean(0) if reads else torch.zeros(cfg.d_value)
        torch.testing.assert_close(out_BV[b], want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_keys_query_and_only_read_value_rows():
    schema, cfg, lookup, ro = _setup()
    batch = toy_batch(schema, 8, seed=1)
    ro.train()
    out = ro(batch, lookup)
    (out.square().sum() + ro.loss()).backward()
    mem = ro.memory
    for p in (mem.c1_ANH, mem.c2_ANH, mem.w_q.weight, mem.q_scale_AD):
        assert p.grad is not None and p.grad.abs().sum() > 0
    ids = batch["hist_items"]
    valid = ids >= 0
    e_b = lookup.lookup("item_id", ids[valid])
    b_Q = valid.nonzero()[:, 0]
    e_u = torch.cat([lookup.lookup("user_id", batch["user_id"]), lookup.lookup("zip_prefix", batch["zip_prefix"])], -1)
    _, slots = mem.slots(torch.cat([e_b, e_u[b_Q]], -1))
    read = torch.zeros(cfg.n_slots, dtype=torch.bool)
    read[slots.flatten()] = True
    g_rows = lookup.emb[VALUE_TABLE].weight.grad.abs().sum(1) > 0
    assert read.any() and (~read).any()
    assert torch.equal(g_rows, read)


def test_padding_contributes_no_memory_loss():
    schema, cfg, lookup, ro = _setup()
    ro.train()
    batch = toy_batch(schema, 8, seed=2)
    ro(batch, lookup)
    base = ro.loss()
    # extra padded positions change neither the read-out nor the loss
    padded = dict(batch, hist_items=torch.cat([batch["hist_items"], torch.full((8, 3), -1)], 1))
    out = ro(padded, lookup)
    torch.testing.assert_close(ro.loss(), base)
    torch.testing.assert_close(out, ro(batch, lookup))
    # without the mask, padded positions query the memory (zero item row) and the loss changes
    _, _, lookup2, ro2 = _setup(mask_padding=False)
    ro2.load_state_dict(ro.state_dict())
    lookup2.load_state_dict(lookup.state_dict())
    ro2.train()
    ro2(batch, lookup2)
    assert not torch.allclose(ro2.loss(), base)
    ro.eval()
    ro(batch, lookup)
    assert ro.loss() is None


def test_the_memory_loss_writes_the_targets_into_the_slots_it_reads():
    schema, cfg, lookup, ro = _setup(lambda_mem=1.0)
    ro.train()
    batch = toy_batch(schema, 16, seed=5)
    values = lookup.emb[VALUE_TABLE].weight
    opt = torch.optim.Adam([values, *ro.parameters()], lr=0.05)   # the embedding rows stay fixed
    losses = []
    for _ in range(30):
        opt.zero_grad()
        ro(batch, lookup)
        losses.append(float(ro.loss().detach()))
        ro.loss().backward()
        opt.step()
    assert losses[-1] < 0.2 * losses[0], losses


def test_memory_config_errors():
    with pytest.raises(ValueError, match="d_key \\(7\\) must be even"):
        MemoryConfig(d_key=7)
    with pytest.raises(ValueError, match="top_k \\(9\\) must be <= memory.k_axis \\(8\\)"):
        MemoryConfig(k_axis=8, top_k=9)
    with pytest.raises(ValueError, match="k_axis \\(40\\) must be <= memory.n_sub \\(32\\)"):
        MemoryConfig(n_sub=32, k_axis=40)
    with pytest.raises(ValueError, match="no feature 'nope'"):
        MemoryReadout(MemoryConfig(**{**TINY, "sequence": "nope"}), toy_schema())
    with pytest.raises(ValueError, match="item_id.*user-side group"):
        MemoryReadout(MemoryConfig(**{**TINY, "user_features": ["item_id"]}), toy_schema())
    with pytest.raises(ValueError, match="must be a sequence feature"):
        MemoryReadout(MemoryConfig(**{**TINY, "sequence": "genres"}), toy_schema())


# ---- inside the models ---------------------------------------------------------------------------------


MEM = dict(TINY, lambda_mem=0.5)


def _model_cfg(arch="tokenmixer_large", ugsep=None, memory=MEM):
    spec = dict(arch=arch, tokenizer="chunk_per_token", n_tokens=4, d_model=16, n_layers=2, ffn_mult=2.0, memory=memory)
    if arch == "tokenmixer_large":
        spec["global_token"] = "none"
    if arch == "dlrm_mlp":
        spec = dict(arch=arch, hidden=[16], memory=memory)
    if ugsep is not None:
        spec["ugsep"] = ugsep
    return TypeAdapter(ModelConfig).validate_python(spec)


@pytest.mark.parametrize("arch", ["dlrm_mlp", "rankmixer", "tokenmixer_large"])
def test_every_model_reads_the_memory_and_adds_its_loss(arch):
    torch.manual_seed(0)
    model = build_model(_model_cfg(arch), toy_schema())
    assert model.encoder.lookup.tables[VALUE_TABLE].n_ids == 36
    b = toy_batch(toy_schema(), 6, seed=4)
    model.train()
    out = model(b)
    assert out.derived_loss is not None and float(out.derived_loss.detach()) > 0
    _, parts = model.loss(out, b["labels"])
    assert parts["derived"] == pytest.approx(float(out.derived_loss.detach()))
    with torch.no_grad():   # the read-out reaches the logits
        model.encoder.lookup.emb[VALUE_TABLE].weight.add_(1.0)
    assert not torch.allclose(model(b).logits_BK, out.logits_BK)


def test_ugsep_user_tokens_read_the_memory_and_stay_candidate_free():
    torch.manual_seed(0)
    model = build_model(_model_cfg(ugsep=dict(user_tokens="1:1")), toy_schema()).double().eval()
    assert "lmn_memory" in model.user_feats and not model.ctx_cols
    b1, b2 = toy_batch(toy_schema(), 6, seed=1), toy_batch(toy_schema(), 6, seed=2)
    for n in model.user_names:
        b2[n] = b1[n].clone()
    for b in (b1, b2):
        b["score"] = b["score"].double()
    with torch.no_grad():
        x1 = model.encode_user(model.split_batch(b1)[0]).x_U
        x2 = model.encode_user(model.split_batch(b2)[0]).x_U
        s1, s2 = model(b1).logits_BK, model(b2).logits_BK
        users, cands = model.split_batch(b1)
        split = model.score(model.encode_user(users), cands, torch.arange(6)).logits_BK
        # the memory is on the user path: other value rows change the user tokens
        model.encoder.lookup.emb[VALUE_TABLE].weight.mul_(3.0)
        x3 = model.encode_user(model.split_batch(b1)[0]).x_U
    for a, c in zip(x1, x2):
        torch.testing.assert_close(a, c)
    assert not torch.allclose(s1, s2)
    torch.testing.assert_close(split, s1)
    assert not torch.allclose(x3[-1], x1[-1])


def test_a_model_with_memory_trains_on_a_fixed_batch():
    from recmix.jobs.train.loop import train_step
    from recmix.jobs.train.loop import make_optimizer
    from recmix.platform.specs.train import OptimizerConfig

    torch.manual_seed(0)
    doc = toy_schema().model_dump(mode="json")   # + hist_ratings: the default side sequence of the memory target
    doc["features"].insert(3, dict(name="hist_ratings", role="sequence", type="sequence", vocab_size=6,
                                   embedding_dim=8, max_len=6, group="history"))
    schema = type(toy_schema()).model_validate(doc)
    mem = dict(n_sub=8, d_key=8, d_value=8, k_axis=4, top_k=4, heads=2)
    model = build_model(_model_cfg(memory=mem), schema)
    b = toy_batch(schema, 32, seed=0)
    opt = make_optimizer(model, OptimizerConfig(name="adamw", lr=0.01))
    v0 = model.encoder.lookup.emb[VALUE_TABLE].weight.detach().clone()
    parts = [train_step(model, b, opt) for _ in range(15)]
    assert parts[-1]["loss"] < 0.8 * parts[0]["loss"], [p["loss"] for p in parts]
    assert all(p["derived"] > 0 for p in parts)
    assert not torch.equal(v0, model.encoder.lookup.emb[VALUE_TABLE].weight)


def test_artifact_round_trip_carries_the_memory(tmp_path):
    import json
    import os

    from recmix.models import artifact as fmt
    from recmix.models.artifact import load_artifact

    spec = _model_cfg(ugsep=dict(user_tokens="1:1")).model_dump(mode="json", exclude_unset=True)
    torch.manual_seed(0)
    m = build_model(TypeAdapter(ModelConfig).validate_python(spec), toy_schema())
    with torch.no_grad():
        m.encoder.lookup.emb[VALUE_TABLE].weight.normal_(0, 1.0)
    d = tmp_path / "v1"
    os.makedirs(d)
    torch.save(m.state_dict(), d / fmt.DENSE)
    (d / fmt.DOC).write_text(json.dumps({"format": fmt.FORMAT, "version": "v1", "model": spec, "dense": fmt.DENSE,
                                         "features": toy_schema().model_dump(mode="json"), "embeddings": None}))
    (tmp_path / fmt.LATEST).write_text("v1\n")
    loaded = load_artifact(str(tmp_path))
    assert torch.equal(loaded.encoder.lookup.emb[VALUE_TABLE].weight, m.encoder.lookup.emb[VALUE_TABLE].weight)
    b = toy_batch(toy_schema(), 5, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(b).logits_BK, m.eval()(b).logits_BK)


def test_user_feature_train_dropout_reaches_the_memory_query():
    doc = toy_schema().model_dump(mode="json")
    doc["features"][0]["train_dropout"] = 0.999   # user_id
    schema = type(toy_schema()).model_validate(doc)
    cfg = MemoryConfig(**{**TINY, "user_features": ["user_id"]})
    torch.manual_seed(0)
    lookup = LocalEmbeddingLookup({**tables_from_schema(schema), **memory_tables(type("M", (), {"memory": cfg}))}, 0.1)
    ro = MemoryReadout(cfg, schema)
    b = toy_batch(schema, 8, seed=1)
    b2 = dict(b, user_id=(b["user_id"] + 1) % 50)
    ro.eval()
    assert not torch.allclose(ro(b, lookup), ro(b2, lookup))       # eval: the user id matters
    ro.train()
    torch.manual_seed(1)
    t1 = ro(b, lookup)
    torch.manual_seed(1)
    torch.testing.assert_close(ro(b2, lookup), t1)                  # training: dropped (p = 0.999), it does not


def test_served_model_reads_the_memory_on_the_cached_user_path(tmp_path):
    from recmix.jobs.serve.features import FeatureCodec, RankRequest
    from recmix.jobs.serve.scorer import Scorer, UserCache
    from recmix.models.artifact import load_artifact
    from tests.serve_fixture import MODEL, offline_scores, request_rows, write_artifact

    model = load_artifact(write_artifact(str(tmp_path), model={**MODEL, "memory": MEM}))
    assert "lmn_memory" in model.user_feats
    codec = FeatureCodec(toy_schema())
    scorer = Scorer(model, "v1", UserCache(8, 60))
    body = request_rows(5, user=2)
    miss = scorer.score_many([codec.encode(RankRequest.model_validate(body))])[0]
    hit = scorer.score_many([codec.encode(RankRequest.model_validate(body))])[0]
    assert (miss.cache_hit, hit.cache_hit) == (False, True) and hit.scores == miss.scores
    assert max(abs(a - b) for a, b in zip(miss.scores, offline_scores(model, body))) < 1e-5
    with torch.no_grad():   # the scores depend on the memory values
        model.encoder.lookup.emb[VALUE_TABLE].weight.mul_(-1.0)
    assert max(abs(a - b) for a, b in zip(miss.scores, offline_scores(model, body))) > 1e-4


@pytest.mark.parametrize("arch,ugsep", [("dlrm_mlp", None), ("tokenmixer_large", None), ("tokenmixer_large", dict(user_tokens="1:1"))])
def test_counters_count_the_memory(arch, ugsep):
    from recmix.models import counters

    cfg = _model_cfg(arch, ugsep)
    model = build_model(cfg, toy_schema())
    counts = counters.model(cfg, toy_schema())
    assert counts["derived"]["params"] > 0
    assert counts["dense"]["params"] == sum(p.numel() for p in model.parameters()) - counts["embedding_params"]
    assert counts["embedding_params"] >= 36 * MEM["d_value"]   # the value table counts as embeddings
