"""Item-neighbourhood token (recmix/models/neighbors.py): the fit against a brute-force reference, the folds
that keep a training row's own label out of its features, the per-value read-out, and the schema checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from recmix.models.derived import fit_columns, fit_derived
from recmix.models.neighbors import NeighborhoodToken, user_fold
from recmix.models.sequence import build_sequence_tokens
from recmix.platform.specs.data import FeatureSchema

L, N_ITEMS, N_USERS, V = 5, 12, 30, 6


def schema(neighbors: dict | None = None, **tok) -> FeatureSchema:
    nb = {"attribute": "hist_ratings", "user": "user_id", "k": 4, "folds": 3, **(neighbors or {})}
    tokens = {"attributes": ["hist_ratings"], "target": "item_id", "pools": [], "target_attention": "none",
              "neighbors": nb, **tok}
    feats = [
        dict(name="user_id", role="user", type="categorical", vocab_size=N_USERS, embedding_dim=4, group="user"),
        dict(name="hist_items", role="sequence", type="sequence", vocab_size=N_ITEMS, embedding_dim=4, table="item_id",
             max_len=L, group="history", tokens=tokens),
        dict(name="hist_ratings", role="sequence", type="sequence", vocab_size=V, embedding_dim=4, max_len=L, group="history"),
        dict(name="item_id", role="item", type="categorical", vocab_size=N_ITEMS, embedding_dim=4, group="item"),
        dict(name="label", role="label", type="dense"),
    ]
    return FeatureSchema.model_validate(dict(groups=[dict(name="user", side="user"), dict(name="history", side="user"),
                                                     dict(name="item")], features=feats))


def token(s: FeatureSchema | None = None) -> NeighborhoodToken:
    (tok,) = build_sequence_tokens(None, s or schema())
    return tok


def train_rows(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, n)
    items = rng.integers(0, N_ITEMS, n)
    labels = (rng.random(n) < 0.3 + 0.4 * (items % 2)).astype(np.float32)
    return {"item_id": items, "user_id": users}, labels


def brute_force(items, users, y, shrink: float) -> np.ndarray:
    """Shrunk cosine of user-centred labels, item by item, with Python loops (the reference)."""
    mean = {u: y[users == u].mean() for u in set(users.tolist())}
    vec = np.zeros((N_ITEMS, N_USERS))
    cnt = np.zeros((N_ITEMS, N_USERS))
    for i, u, t in zip(items, users, y):
        vec[i, u] += t - mean[u]
        cnt[i, u] += 1
    vec = np.divide(vec, cnt, out=np.zeros_like(vec), where=cnt > 0)
    S = np.zeros((N_ITEMS, N_ITEMS))
    for a in range(N_ITEMS):
        for b in range(N_ITEMS):
            if a == b:
                continue
            co = float(((cnt[a] > 0) & (cnt[b] > 0)).sum())
            na, nb = np.linalg.norm(vec[a]), np.linalg.norm(vec[b])
            S[a, b] = vec[a] @ vec[b] / (max(na, 1e-9) * max(nb, 1e-9)) * co / (co + shrink)
    return S


def test_fit_matches_brute_force_and_folds_leave_out_their_users():
    tok = token()
    cols, y = train_rows()
    fit_derived(tok, lambda need: (cols, y))
    assert fit_columns(tok) == ["item_id", "user_id"]
    folds = user_fold(cols["user_id"], 3)
    for g in range(4):   # 3 folds + all users
        keep = folds != g if g < 3 else np.ones(len(y), bool)
        S = brute_force(cols["item_id"][keep], cols["user_id"][keep], y[keep], shrink=10.0)
        ids, sims = tok.ids_GNK[g].numpy(), tok.sims_GNK[g].numpy()
        for i in range(N_ITEMS):
            want = np.sort(np.abs(S[i]))[::-1][:4]
            assert np.allclose(np.sort(np.abs(sims[i]))[::-1], want, atol=1e-5)
            valid = ids[i] >= 0
            assert np.allclose(sims[i][valid], S[i][ids[i][valid]], atol=1e-5)
    # a fold's table does not move when the labels of that fold's own users change
    y2 = y.copy()
    y2[folds == 1] = np.random.default_rng(7).random(int((folds == 1).sum())) < 0.5   # (a flip would cancel in the products)
    tok2 = token()
    fit_derived(tok2, lambda need: (cols, y2))
    assert torch.equal(tok2.sims_GNK[1], tok.sims_GNK[1]) and not torch.equal(tok2.sims_GNK[3], tok.sims_GNK[3])


def batch() -> dict[str, torch.Tensor]:
    return {"hist_items": torch.tensor([[1, 2, 3, 4, 5], [3, 7, -1, -1, -1], [-1] * 5]),
            "hist_ratings": torch.tensor([[5, 1, 4, 5, 2], [1, 5, -1, -1, -1], [-1] * 5]),
            "item_id": torch.tensor([0, 0, 0]), "user_id": torch.tensor([3, 4, 5])}


def fitted() -> NeighborhoodToken:
    tok = token()
    fit_derived(tok, lambda need: train_rows())
    return tok.eval()


def test_readout_sums_similarity_per_value_and_ignores_padding():
    tok = fitted()
    b = batch()
    with torch.no_grad():
        out = tok(b, None)
    assert out.shape == (3, V + 1)
    ids, sims = tok.ids_GNK[3, 0].tolist(), tok.sims_GNK[3, 0].tolist()
    sim = dict(zip(ids, sims))
    for r in range(2):
        per_value = np.zeros(V)
        den = 0.0
        for item, rating in zip(b["hist_items"][r].tolist(), b["hist_ratings"][r].tolist()):
            if item >= 0:
                per_value[rating] += sim.get(item, 0.0)
                den += abs(sim.get(item, 0.0))
        assert np.allclose(out[r, :V].numpy(), per_value / (1 + den), atol=1e-6)
        assert out[r, V].item() == pytest.approx(np.log1p(den), abs=1e-6)
    assert torch.equal(out[2], torch.zeros(V + 1))   # empty history


def test_pairing_candidate_and_fold_dependence():
    tok = fitted()
    b = batch()
    with torch.no_grad():
        out = tok(b, None)
        perm = [3, 0, 4, 1, 2]
        moved = tok({**b, "hist_items": b["hist_items"][:, perm], "hist_ratings": b["hist_ratings"][:, perm]}, None)
        assert torch.allclose(moved[0], out[0], atol=1e-6)           # whole positions: a sum, order-free
        swapped = {**b, "hist_ratings": b["hist_ratings"].clone()}
        swapped["hist_ratings"][0] = b["hist_ratings"][0][perm]     # same ratings, other items get them
        assert not torch.allclose(tok(swapped, None)[0], out[0])
        other = tok({**b, "item_id": torch.tensor([1, 0, 0])}, None)
        assert not torch.allclose(other[0], out[0]) and torch.equal(other[1], out[1])
        tok.train()
        folds = user_fold(b["user_id"], 3)
        in_training = tok(b, None)   # a training row reads the table fitted without its user's fold
        tok.ids_GNK[3], tok.sims_GNK[3] = tok.ids_GNK[int(folds[0])], tok.sims_GNK[int(folds[0])]
        tok.eval()
        assert torch.allclose(tok(b, None)[0], in_training[0])


def test_token_sits_on_the_candidate_side_and_the_state_dict_carries_the_fit():
    tok = fitted()
    assert (tok.name, tok.group, tok.inputs) == ("hist_items_neighbors", "item",
                                                 ("hist_items", "hist_ratings", "item_id", "user_id"))
    fresh = token()
    fresh.load_state_dict(tok.state_dict())
    assert torch.equal(fresh.sims_GNK, tok.sims_GNK) and torch.equal(fresh.ids_GNK, tok.ids_GNK)
    assert (tok.ids_GNK.diff(dim=-1) >= 0).all()   # the read-out binary-searches each item's neighbours
    # tables saved in another order (before the read-out searched them: by similarity) are sorted on load
    state = tok.state_dict()
    perm = torch.randperm(state["ids_GNK"].shape[-1], generator=torch.Generator().manual_seed(3))
    shuffled = {"ids_GNK": state["ids_GNK"][..., perm], "sims_GNK": state["sims_GNK"][..., perm]}
    assert not torch.equal(shuffled["ids_GNK"], state["ids_GNK"])
    old = token().eval()
    old.load_state_dict(shuffled)
    assert torch.equal(old.ids_GNK, tok.ids_GNK) and torch.equal(old.sims_GNK, tok.sims_GNK)
    with torch.no_grad():
        assert torch.equal(old(batch(), None), tok(batch(), None))


@pytest.mark.parametrize("change, match", [
    (dict(tok={"target": None}), "neighbors needs a target"),
    (dict(neighbors={"attribute": "hist_gaps"}), "must be one of the attributes"),
    (dict(neighbors={"user": "item_id"}), "must be a categorical feature in a user-side group"),
    (dict(neighbors={"k": 0}), "greater than or equal to 1"),
    (dict(neighbors={"folds": 1}), "greater than or equal to 2"),
])
def test_schema_refuses_bad_neighbors(change, match):
    with pytest.raises(ValidationError, match=match):
        schema(change.get("neighbors"), **change.get("tok", {}))


def test_fit_refuses_ids_outside_the_vocab():
    tok = token()
    cols, y = train_rows()
    cols["item_id"] = cols["item_id"].copy()
    cols["item_id"][0] = N_ITEMS
    with pytest.raises(ValueError, match=r"'item_id' ids must lie in \[0, 12\)"):
        fit_derived(tok, lambda need: (cols, y))


def test_ugsep_keeps_the_token_on_the_candidate_side_and_split_scoring_equals_forward():
    from pydantic import TypeAdapter

    from recmix.models.build import build_model
    from recmix.models.toy import toy_batch
    from recmix.models.ugsep import UserState
    from recmix.platform.specs.model import ModelConfig

    s = schema(pools=["mean"], target_attention="softmax")
    cfg = TypeAdapter(ModelConfig).validate_python(dict(
        arch="tokenmixer_large", n_tokens=4, d_model=16, n_layers=2, ffn_mult=2.0, ugsep=dict(user_tokens="1:1")))
    torch.manual_seed(0)
    model = build_model(cfg, s)
    fit_derived(model, lambda need: train_rows())
    model = model.double().eval()
    assert "hist_items_neighbors" in model.cand_feats and "hist_items_neighbors" not in model.user_feats
    assert "user_id" in model.ctx_cols   # the token reads the user's id per candidate (its fold in training)
    b = toy_batch(s, 6, 3)
    b["hist_ratings"] = torch.where(b["hist_items"] >= 0, b["hist_ratings"].clamp(min=1), -1)
    with torch.no_grad():
        full = model(b).logits_BK
        users, cands = model.split_batch(b)
        states = [model.encode_user({n: v[i:i + 1] for n, v in users.items()}) for i in range(6)]
        split = model.score(UserState.cat(states), cands, torch.arange(6)).logits_BK
        x1 = model.encode_user(users).x_U
        other = {**cands, "item_id": (cands["item_id"] + 5) % N_ITEMS}
        moved = model.score(UserState.cat(states), other, torch.arange(6)).logits_BK
    torch.testing.assert_close(split, full)
    assert not torch.allclose(moved, full)
    with torch.no_grad():   # other candidates leave the user path as it was
        x2 = model.encode_user(model.split_batch({**b, "item_id": (b["item_id"] + 5) % N_ITEMS})[0]).x_U
    for a, c in zip(x1, x2):
        assert torch.equal(a, c)


def test_builtin_schema_sizes_k_to_the_catalogue():
    from recmix.jobs.prepare.builtin import NEIGHBOR_BUDGET, builtin_schema

    def k(n_items):
        f = next(x for x in builtin_schema(100, n_items, 20).features if x.name == "hist_items")
        return f.tokens.neighbors.k, (f.tokens.neighbors.folds + 1) * (n_items + 1)
    (small, cells), (large, _) = k(1682), k(50_000)
    assert small == 256 and cells * small <= NEIGHBOR_BUDGET   # ml-100k's catalogue gets the larger k
    assert large == 64                                          # a big catalogue keeps the spec's default
