"""Position-aware sequence tokens (recmix/models/sequence.py): pairing, permutation, candidate dependence."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from recmix.models.embedding import LocalEmbeddingLookup, tables_from_schema
from recmix.models.sequence import build_sequence_tokens
from recmix.models.toy import toy_batch
from recmix.platform.specs.data import FeatureSchema, SeqPool, TargetAttention

L = 6


def schema(tokens: dict | None = None, **over) -> FeatureSchema:
    tokens = {"attributes": ["hist_ratings"], "target": "item_id", **(tokens or {})}
    feats = [
        dict(name="user_id", role="user", type="categorical", vocab_size=50, embedding_dim=8, group="user"),
        dict(name="hist_items", role="sequence", type="sequence", vocab_size=40, embedding_dim=8, table="item_id",
             max_len=L, group="history", tokens=tokens),
        dict(name="hist_ratings", role="sequence", type="sequence", vocab_size=6, embedding_dim=8, max_len=L, group="history"),
        dict(name="item_id", role="item", type="categorical", vocab_size=40, embedding_dim=8, group="item"),
        dict(name="label", role="label", type="dense"),
    ]
    for f in feats:
        f.update(over.get(f["name"], {}))
    return FeatureSchema.model_validate(dict(groups=[dict(name="user", side="user"), dict(name="history", side="user"),
                                                     dict(name="item")], features=feats))


def parts(s: FeatureSchema, seed: int = 0):
    torch.manual_seed(seed)
    pools, target = build_sequence_tokens(None, s)
    assert (pools.name, pools.group, target.name, target.group) == ("hist_items_pooled", "history", "hist_items_target", "item")
    assert pools.encoder is target.encoder and target.inputs == ("hist_items", "hist_ratings", "item_id")
    enc = pools.encoder
    lookup = LocalEmbeddingLookup(tables_from_schema(s), init_std=0.5)
    return enc, pools, target, lookup


def batch(s: FeatureSchema, n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    b = toy_batch(s, n, seed)
    valid = b["hist_items"] >= 0
    b["hist_ratings"] = torch.where(valid, b["hist_ratings"].clamp(min=1), torch.full_like(b["hist_ratings"], -1))
    b["hist_items"][0] = torch.tensor([1, 2, 3, 4, 5, 6])   # a full row with distinct items and ratings
    b["hist_ratings"][0] = torch.tensor([1, 2, 3, 4, 5, 1])
    b["hist_items"][1], b["hist_ratings"][1] = -1, -1          # an empty history
    return b


@pytest.mark.parametrize("mode", list(TargetAttention)[:2])
def test_permuting_ratings_across_positions_changes_every_token(mode):
    s = schema({"target_attention": mode.value})
    _, pools, target, lookup = parts(s)
    b = batch(s)
    swapped = {**b, "hist_ratings": b["hist_ratings"].clone()}
    swapped["hist_ratings"][0] = b["hist_ratings"][0][[1, 0, 2, 3, 4, 5]]   # same ratings, other items get them
    with torch.no_grad():
        W = pools.encoder.width
        a, a2 = pools(b, lookup)[0], pools(swapped, lookup)[0]
        for k, pool in enumerate(pools.pools):   # each pooled token on its own
            assert not torch.allclose(a[k * W:(k + 1) * W], a2[k * W:(k + 1) * W], atol=1e-5), pool
        assert not torch.allclose(target(b, lookup)[0], target(swapped, lookup)[0], atol=1e-5)
        # the other rows are untouched
        torch.testing.assert_close(pools(b, lookup)[2:], pools(swapped, lookup)[2:])


def test_permuting_whole_positions_keeps_set_pools_and_target_attention():
    s = schema({"target_attention": "softmax", "pools": ["mean", "attention", "recency"]})
    _, pools, target, lookup = parts(s)
    b = batch(s)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    moved = {**b, "hist_items": b["hist_items"].clone(), "hist_ratings": b["hist_ratings"].clone()}
    moved["hist_items"][0], moved["hist_ratings"][0] = b["hist_items"][0][perm], b["hist_ratings"][0][perm]
    W = pools.encoder.width
    with torch.no_grad():
        pools.recency_logits.normal_()   # zero logits (the init) weigh like the mean
        a, a2 = pools(b, lookup)[0], pools(moved, lookup)[0]
        torch.testing.assert_close(a[:2 * W], a2[:2 * W])                  # mean and attention: order-free
        assert not torch.allclose(a[2 * W:3 * W], a2[2 * W:3 * W], atol=1e-5)   # recency: order is its point
        torch.testing.assert_close(a[-1:], a2[-1:])                         # the length feature
        torch.testing.assert_close(target(b, lookup)[0], target(moved, lookup)[0])


def test_target_attention_depends_on_the_candidate_pools_do_not():
    s = schema()
    _, pools, target, lookup = parts(s)
    b = batch(s)
    other = {**b, "item_id": (b["item_id"] + 1) % 40}
    with torch.no_grad():
        assert not torch.allclose(target(b, lookup)[0], target(other, lookup)[0], atol=1e-6)
        torch.testing.assert_close(pools(b, lookup), pools(other, lookup))
    # gradient reaches the candidate's row of the item table through the query
    lookup.zero_grad()
    target(b, lookup).sum().backward()
    assert lookup.emb["item_id"].weight.grad[b["item_id"]].abs().sum() > 0


def test_empty_history_gives_zero_tokens_and_no_nan():
    s = schema()
    _, pools, target, lookup = parts(s)
    b = batch(s)
    with torch.no_grad():
        p, t = pools(b, lookup), target(b, lookup)
    assert torch.isfinite(p).all() and torch.isfinite(t).all()
    assert torch.equal(p[1], torch.zeros_like(p[1])) and torch.equal(t[1], torch.zeros_like(t[1]))
    assert pools.width == 3 * 32 + 1 and p.shape == (16, pools.width) and t.shape == (16, 32)


def test_misaligned_attribute_is_refused():
    s = schema()
    _, pools, _, lookup = parts(s)
    b = batch(s)
    b["hist_ratings"][0, -1] = -1
    with pytest.raises(ValueError, match="'hist_ratings' is not aligned with 'hist_items'"):
        pools(b, lookup)


def test_training_moves_every_parameter():
    s = schema({"target_attention": "sigmoid"})
    _, pools, target, lookup = parts(s)
    mods = torch.nn.ModuleList([pools, target, lookup])
    b = batch(s)
    (pools(b, lookup).square().sum() + target(b, lookup).square().sum()).backward()
    missing = [n for n, p in mods.named_parameters() if "user_id" not in n and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


@pytest.mark.parametrize("tokens, over, msg", [
    ({"attributes": ["nope"]}, {}, "attribute 'nope' is not a feature"),
    ({"attributes": ["user_id"]}, {}, "attribute 'user_id' must be another sequence feature"),
    ({}, {"hist_ratings": {"max_len": 5}}, "must share group and max_len with 'hist_items'"),
    ({"target": "user_id"}, {}, "target 'user_id' must be a categorical feature sharing table 'item_id'"),
    ({"target": None}, {}, "target_attention softmax needs a target"),
    ({"pools": ["mean", "mean"]}, {}, "pools has duplicates"),
    ({"pools": [], "target_attention": "none"}, {}, "build nothing"),
])
def test_schema_errors_name_the_values(tokens, over, msg):
    with pytest.raises(ValidationError, match=msg):
        schema(tokens, **over)


def test_tokens_only_on_sequence_features():
    with pytest.raises(ValidationError, match="categorical feature 'user_id' takes no tokens"):
        schema(None, user_id={"tokens": {"pools": ["mean"], "target_attention": "none"}})
    assert schema().feature("hist_items").tokens.pools == [SeqPool.mean, SeqPool.recency, SeqPool.attention]


# --- in a model: UG-Sep keeps the pooled tokens on the user path and target attention on the candidate side ---

def ugsep_model(arch="tokenmixer_large"):
    from pydantic import TypeAdapter

    from recmix.models.build import build_model
    from recmix.platform.specs.model import ModelConfig

    spec = dict(arch=arch, tokenizer="chunk_per_token", n_tokens=4, d_model=16, n_layers=2, ffn_mult=2.0,
                ugsep=dict(user_tokens="1:1"))
    if arch == "tokenmixer_large":
        spec.update(global_token="none", down_init_std_scale=0.5)
    torch.manual_seed(0)
    return build_model(TypeAdapter(ModelConfig).validate_python(spec), schema()).double().eval()


@pytest.mark.parametrize("arch", ["tokenmixer_large", "rankmixer"])
def test_ugsep_sides_and_user_tokens_stay_candidate_free(arch):
    model = ugsep_model(arch)
    assert "hist_items_pooled" in model.user_feats and "hist_items_target" in model.cand_feats
    assert model.ctx_cols == ["hist_items", "hist_ratings"]
    s = schema()
    b1, b2 = batch(s, 8, seed=1), batch(s, 8, seed=2)
    for n in model.user_names:
        b2[n] = b1[n].clone()
    with torch.no_grad():
        x1 = model.encode_user(model.split_batch(b1)[0]).x_U
        x2 = model.encode_user(model.split_batch(b2)[0]).x_U
        s1, s2 = model(b1).logits_BK, model(b2).logits_BK
    for a, c in zip(x1, x2):
        assert torch.equal(a, c)
    assert not torch.allclose(s1, s2)   # the candidates changed, target attention with them
    # the user tokens have no gradient path into the target-attention scorer
    u, _ = model.split_batch(b1)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(model.encode_user(u).x_U[-1].sum(), list(params.values()), allow_unused=True)))
    scorer = [n for n in params if ".scorer." in n]
    assert scorer and all(grads[n] is None or not grads[n].any() for n in scorer)


def test_ugsep_split_scoring_equals_forward_with_sequence_tokens():
    model = ugsep_model()
    s = schema()
    b = batch(s, 7, seed=3)
    with torch.no_grad():
        full = model(b).logits_BK
        users, cands = model.split_batch(b)
        from recmix.models.ugsep import UserState

        states = [model.encode_user({n: v[i:i + 1] for n, v in users.items()}) for i in range(7)]
        split = model.score(UserState.cat(states), cands, torch.arange(7)).logits_BK
        # the same user scoring another candidate: only the candidate side moves
        other = {**cands, "item_id": (cands["item_id"] + 3) % 40}
        moved = model.score(UserState.cat(states), other, torch.arange(7)).logits_BK
    torch.testing.assert_close(split, full)
    assert not torch.allclose(moved, full)


def test_train_dropout_zeroes_whole_rows_in_training_only():
    from recmix.models.embedding import FeatureEncoder

    s = schema(None, user_id={"train_dropout": 0.5})
    lookup = LocalEmbeddingLookup(tables_from_schema(s), init_std=0.5)
    enc = FeatureEncoder(s, lookup)
    b = batch(s, 400)
    torch.manual_seed(0)
    u = enc.train()(b)["user_id"]
    zero = (u == 0).all(1)
    assert 0.4 < zero.float().mean() < 0.6 and ((u != 0).all(1) | zero).all()   # whole rows, the rest untouched
    torch.testing.assert_close(u[~zero], lookup.lookup("user_id", b["user_id"])[~zero])
    torch.testing.assert_close(enc.eval()(b)["user_id"], lookup.lookup("user_id", b["user_id"]))
    with pytest.raises(ValidationError, match="label feature 'label' takes no train_dropout"):
        schema(None, label={"train_dropout": 0.1})
