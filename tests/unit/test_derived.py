"""The derived-features hook: a module's per-row vector joins a token group like a schema feature, takes
that group's side under UG-Sep, and its loss reaches the model's loss.

The two derived features here are test modules (the real ones are the sequence tokens and the LMN
read-out, tested in their own files): one user-side (reads the history), one candidate-side that reads
the history too (the shape of target attention), so the UG-Sep context path is exercised.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

import recmix.models.derived_registry as registry
from recmix.models.build import build_model
from recmix.models.derived import DerivedFeature
from recmix.models.toy import toy_batch, toy_schema
from recmix.models.ugsep import UserState
from recmix.platform.specs.model import ModelConfig


def _hist_BLE(batch, lookup):
    ids = batch["hist_items"]
    mask = ids >= 0
    rows = lookup.lookup("item_id", ids.clamp(min=0)) * mask.unsqueeze(-1)
    return rows, mask


class HistMean(DerivedFeature):
    name, group, width, inputs = "hist_mean", "history", 8, ("hist_items",)

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, batch, lookup):
        rows, mask = _hist_BLE(batch, lookup)
        out = self.proj(rows.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
        self._last_loss = 0.5 * out.pow(2).mean()
        return out


class TargetDot(DerivedFeature):
    """Candidate-side: the history weighted by its similarity to the candidate item."""
    name, group, width, inputs = "target_dot", "item", 8, ("hist_items", "item_id")

    def forward(self, batch, lookup):
        rows, mask = _hist_BLE(batch, lookup)
        q = lookup.lookup("item_id", batch["item_id"])
        w = ((rows * q.unsqueeze(1)).sum(-1) * 100).masked_fill(~mask, -1e9).softmax(1) * mask
        return (w.unsqueeze(-1) * rows).sum(1)


class BadUserSide(DerivedFeature):
    name, group, width, inputs = "bad", "history", 8, ("item_id",)

    def forward(self, batch, lookup):
        return lookup.lookup("item_id", batch["item_id"])


@pytest.fixture
def derived(monkeypatch):
    chosen: list = []
    monkeypatch.setattr(registry, "_builders", lambda: [lambda cfg, schema: [cls() for cls in chosen]])
    return chosen


def cfg(arch="tokenmixer_large", ugsep=None, tokenizer="chunk_per_token"):
    spec = dict(arch=arch, tokenizer=tokenizer, n_tokens=4, d_model=16, n_layers=2, ffn_mult=2.0)
    if arch == "tokenmixer_large":
        spec["global_token"] = "none"
    if arch == "dlrm_mlp":
        spec = dict(arch=arch, hidden=[16])
    if ugsep is not None:
        spec["ugsep"] = ugsep
    return TypeAdapter(ModelConfig).validate_python(spec)


def build(c):
    torch.manual_seed(0)
    return build_model(c, toy_schema()).double().eval()


def batch(B, seed=0):
    b = toy_batch(toy_schema(), B, seed)
    b["score"] = b["score"].double()
    return b


@pytest.mark.parametrize("arch", ["dlrm_mlp", "rankmixer", "tokenmixer_large"])
def test_derived_features_feed_every_model_and_their_loss_is_added(derived, arch):
    derived += [HistMean, TargetDot]
    model = build(cfg(arch))
    assert model.encoder.widths["target_dot"] == 8
    b = batch(5)
    out = model(b)
    assert out.derived_loss is not None
    _, parts = model.loss(out, b["labels"].double())
    assert parts["derived"] == pytest.approx(float(model.encoder.derived[0].loss().detach()))
    with torch.no_grad():
        model.encoder.derived[0].proj.bias.add_(1.0)   # the derived vector reaches the logits
    assert not torch.allclose(model(b).logits_BK, out.logits_BK)


def test_ugsep_split_path_equals_forward_with_a_candidate_side_feature_reading_the_history(derived):
    derived += [HistMean, TargetDot]
    model = build(cfg(ugsep=dict(user_tokens="1:1")))
    assert model.ctx_cols == ["hist_items"]
    assert "hist_mean" in model.user_feats and "target_dot" in model.cand_feats
    b = batch(7, seed=3)
    with torch.no_grad():
        full = model(b).logits_BK
        users, cands = model.split_batch(b)
        states = [model.encode_user({n: v[i:i + 1] for n, v in users.items()}) for i in range(7)]
        # trim one state's history so that cat must pad ragged list columns
        states[0].raw["hist_items"] = states[0].raw["hist_items"][:, :3]
        users0 = {n: v[:1] for n, v in users.items()}
        users0["hist_items"] = users0["hist_items"][:, :3]
        b0 = {n: v.clone() for n, v in b.items()}
        b0["hist_items"][0, 3:] = -1
        split = model.score(UserState.cat(states), cands, torch.arange(7)).logits_BK
        expect = model(b0).logits_BK
    torch.testing.assert_close(split, expect)
    torch.testing.assert_close(split[1:], full[1:])


def test_user_tokens_stay_candidate_free_with_derived_features(derived):
    derived += [HistMean, TargetDot]
    model = build(cfg(ugsep=dict(user_tokens="1:1")))
    b1, b2 = batch(6, seed=1), batch(6, seed=2)
    for n in model.user_names:
        b2[n] = b1[n].clone()
    with torch.no_grad():
        x1 = model.encode_user(model.split_batch(b1)[0]).x_U
        x2 = model.encode_user(model.split_batch(b2)[0]).x_U
        s1, s2 = model(b1).logits_BK, model(b2).logits_BK
    for a, c in zip(x1, x2):
        torch.testing.assert_close(a, c)
    assert not torch.allclose(s1, s2)   # the candidate side, target attention included, does change


def test_a_user_side_feature_reading_candidate_columns_is_refused(derived):
    derived += [BadUserSide]
    with pytest.raises(ValueError, match="bad.*user side.*item_id"):
        build(cfg(ugsep=dict(user_tokens="1:1")))
    build(cfg())   # without UG-Sep there is no side to violate


def test_derived_names_and_groups_are_checked(derived):
    class Clash(HistMean):
        name = "item_id"

    class NoGroup(HistMean):
        group = "nowhere"

    derived += [Clash]
    with pytest.raises(ValueError, match="clashes"):
        build(cfg())
    derived[:] = [NoGroup]
    with pytest.raises(ValueError, match="group 'nowhere'"):
        build(cfg())


@pytest.mark.parametrize("arch,ugsep,tokenizer", [("dlrm_mlp", None, "chunk_per_token"),
                                                  ("rankmixer", None, "chunk_per_token"),
                                                  ("tokenmixer_large", None, "chunk_per_token"),
                                                  ("tokenmixer_large", dict(user_tokens="1:1"), "chunk_per_token")])
def test_counters_count_the_derived_features(derived, arch, ugsep, tokenizer):
    from recmix.models import counters

    derived += [HistMean, TargetDot]
    c = cfg(arch, ugsep, tokenizer)
    model = build(c)
    counts = counters.model(c, toy_schema())
    total = sum(p.numel() for p in model.parameters())
    assert counts["dense"]["params"] == total - counts["embedding_params"]
    assert counts["derived"]["params"] == 8 * 8 + 8   # HistMean's projection
