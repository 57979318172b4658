"""Property tests (hypothesis) for the ranking semantics the platform promises."""

from __future__ import annotations

import functools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recmix.models.mixing import mix, revert
from recmix.platform import hashing


@st.composite
def mix_shapes(draw):
    T = draw(st.integers(1, 9))
    H = draw(st.integers(1, 8))
    D = H * draw(st.integers(1, 6))
    B = draw(st.integers(1, 4))
    return B, T, D, H


@settings(max_examples=60, deadline=None)
@given(mix_shapes(), st.integers(0, 2**31 - 1))
def test_revert_mix_is_identity_bitwise(shape, seed):
    B, T, D, H = shape
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(revert(mix(x, H), T), x)
    y = torch.randn(B, H, T * D // H, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    assert torch.equal(mix(revert(y, T), H), y)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=200), st.integers(1, 64), st.sampled_from(["user", "item"]))
def test_shard_routing_is_a_pure_function_in_range(ids, n_shards, table):
    a = np.array(ids, dtype=np.int64)
    s = hashing.shard_of(table, a, n_shards)
    assert s.min() >= 0 and s.max() < n_shards
    # Routing one id never depends on the other ids of the batch.
    assert np.array_equal(s, np.concatenate([hashing.shard_of(table, a[i:i + 1], n_shards) for i in range(len(a))]))


@functools.lru_cache(maxsize=1)
def _ugsep_model():
    from pydantic import TypeAdapter

    from recmix.models.build import build_model
    from recmix.models.toy import toy_schema
    from recmix.platform.specs.model import ModelConfig

    torch.manual_seed(0)
    cfg = TypeAdapter(ModelConfig).validate_python(dict(
        arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="mlp", n_tokens=4, d_model=16, n_layers=2,
        ffn_mult=2.0, down_init_std_scale=0.5, ugsep={"user_tokens": "1:1"}))
    return build_model(cfg, toy_schema()).double().eval()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(0, 10_000), st.randoms(use_true_random=False))
def test_ugsep_candidate_permutation_permutes_scores(n, seed, rnd):
    from recmix.models.toy import toy_batch, toy_schema

    model = _ugsep_model()
    user = toy_batch(toy_schema(), 1, seed)
    cands = toy_batch(toy_schema(), n, seed + 1)
    cands["score"] = cands["score"].double()
    perm = list(range(n))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    with torch.no_grad():
        state = model.encode_user({k: user[k] for k in model.user_names})
        c = {k: cands[k] for k in model.cand_names}
        s = model.score(state, c, torch.zeros(n, dtype=torch.long)).logits_BK
        sp = model.score(state, {k: v[perm] for k, v in c.items()}, torch.zeros(n, dtype=torch.long)).logits_BK
    torch.testing.assert_close(sp, s[perm], rtol=0, atol=1e-12)
