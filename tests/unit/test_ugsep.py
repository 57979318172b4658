"""UG-Sep invariants (spec models.md §7, 18-28): user tokens stay pure; split path == full forward."""

from __future__ import annotations

import pytest
import torch

from pydantic import TypeAdapter

from recmix.models.build import build_model
from recmix.models.toy import toy_batch, toy_schema
from recmix.models.tokenmixer_large import TokenMixerLargeBlock
from recmix.models.ugsep import unique_users
from recmix.platform.specs.model import ModelConfig
from recmix.platform.specs.ugsep import UGSepConfig


def make(**kw):
    torch.manual_seed(0)
    return build_model(model_cfg(**kw), toy_schema()).double().eval()


def model_cfg(T=4, D=16, H=None, L=3, glob="none", down=0.5, backbone="tokenmixer_large", **ug):
    # ratio="u:g" and n_user_tokens=N are both the config's one `user_tokens` field.
    for key in ("ratio", "n_user_tokens"):
        if key in ug:
            ug["user_tokens"] = ug.pop(key)
    spec = dict(arch=backbone, tokenizer="chunk_per_token", n_tokens=T, d_model=D, n_heads=H, n_layers=L,
                ffn_mult=2.0, ugsep=ug)
    if backbone == "tokenmixer_large":
        # The global token side is a UG-Sep option (spec §5.4): g reads every feature, u the user side only.
        spec.update(down_init_std_scale=down, global_token="none" if glob == "none" else "mlp")
        if glob != "none":
            ug["global_token_side"] = {"g": "candidate", "u": "user"}[glob]
    return TypeAdapter(ModelConfig).validate_python(spec)


def batch(B, seed=0):
    b = toy_batch(toy_schema(), B, seed)
    b["score"] = b["score"].double()
    return b


def user_tokens_per_layer(model, b):
    u, _ = model.split_batch(b)
    return model.encode_user(u).x_U


@pytest.mark.parametrize("kw", [dict(), dict(ratio="3:1"), dict(ic_mode="pre_mask", ic_proj="dense"),
                                dict(ic_proj="low_rank", ic_rank=5), dict(glob="g"), dict(glob="u"),
                                dict(backbone="rankmixer"), dict(backbone="rankmixer", ratio="3:1", ic_mode="pre_mask")])
def test_user_tokens_unchanged_when_candidate_features_change(kw):
    model = make(**kw)
    b1 = batch(6, seed=1)
    b2 = batch(6, seed=2)
    for n in model.user_names:
        b2[n] = b1[n].clone()
    with torch.no_grad():
        x1, x2 = user_tokens_per_layer(model, b1), user_tokens_per_layer(model, b2)
        s1, s2 = model(b1).logits_BK, model(b2).logits_BK
    for a, c in zip(x1, x2):
        assert torch.equal(a, c)
    assert not torch.equal(s1, s2)  # the candidates did change: scores must see it


def test_user_tokens_have_no_gradient_from_candidate_inputs_or_ic():
    model = make(ic_mode="masked_off")
    b = batch(5)
    u, c = model.split_batch(b)
    state = model.encode_user(u)
    loss = state.x_U[-1].sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [p for n, p in params.items()], allow_unused=True)
    by_name = dict(zip(params, grads))
    for name, g in by_name.items():
        if name.startswith(("ic.", "cand_tokenizer.", "heads.", "aux_towers.")):
            assert g is None or torch.count_nonzero(g) == 0, name


def test_zero_user_tokens_equals_unmasked_baseline_bitwise():
    model = make(n_user_tokens=0)
    b = batch(7)
    with torch.no_grad():
        got = model(b).logits_BK
        # Baseline: TokenMixer-Large blocks (mode B) with the same weights, no mask.
        feats = model.cand_encoder({n: b[n] for n in model.cand_names})
        x = model.cand_tokenizer(torch.cat([feats[n] for n in model.cand_names], -1))
        hist = [x]
        for l, blk in enumerate(model.blocks, start=1):
            assert isinstance(blk, TokenMixerLargeBlock)
            x = blk(x)
            if model.gap and l % model.gap == 0 and l < len(model.blocks):
                x = x + hist[l - model.gap]
            hist.append(x)
        want = model.heads(x.mean(1))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw", [dict(), dict(ratio="3:1", ic_proj="per_head"), dict(ic_mode="none"),
                                dict(backbone="rankmixer")])
def test_split_path_equals_full_forward_and_aggregation(kw):
    model = make(**kw)
    users = batch(3, seed=5)
    cands = batch(10, seed=6)
    user_index = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2])
    full = {n: users[n][user_index] for n in model.user_names} | {n: cands[n] for n in model.cand_names}
    with torch.no_grad():
        split = model.score(model.encode_user({n: users[n] for n in model.user_names}),
                            {n: cands[n] for n in model.cand_names}, user_index).logits_BK
        agg = model(full).logits_BK
        model.ug = UGSepConfig.model_validate({**model.ug.model_dump(exclude_unset=True), "user_aggregation": "per_row"})
        per_row = model(full).logits_BK
    torch.testing.assert_close(split, per_row, rtol=0, atol=1e-12)
    torch.testing.assert_close(agg, per_row, rtol=0, atol=1e-12)


def reference_masked_forward(model, b):
    """Spec §5.3-5.4 written on full (B, T, D) tensors with explicit masks: an independent oracle."""
    from recmix.models.mixing import mix, revert

    B = b["item_id"].shape[0]
    T, Tu, H, Cu, D = model.T, model.Tu, model.H, model.Cu, model.D
    S = D // H
    fu = model.user_encoder({n: b[n] for n in model.user_names})
    fg = model.cand_encoder({n: b[n] for n in model.cand_names})
    f_U = torch.cat([fu[n] for n in model.user_names], -1)
    extra = f_U if model.cand_tokenizer.global_mlp is not None else None
    x = torch.cat([model.user_tokenizer(f_U), model.cand_tokenizer(torch.cat([fg[n] for n in model.cand_names], -1), extra)], 1)
    hist = [x]
    for l, blk in enumerate(model.blocks, start=1):
        n = blk.norm1(x)
        m = mix(n, H).reshape(B, H, T, S)
        pre = m.clone()
        m[:, :Cu, Tu:] = 0                      # user heads never read candidate tokens
        m = m.reshape(B, H, T * S)
        if model.ic is not None:
            m = torch.cat([m[:, :Cu], m[:, Cu:] + model.ic[l - 1](pre[:, :Cu].reshape(B, Cu, -1), n[:, Tu:])], 1)
        y = blk.f1(m).reshape(B, H, T, S)
        y[:, Cu:, :Tu] = 0                      # revert mask: user tokens drop candidate heads' slices
        x = x + revert(y.reshape(B, H, T * S), T)
        x = x + blk.f2(blk.norm2(x))
        if model.gap and l % model.gap == 0 and l < len(model.blocks):
            x = x + hist[l - model.gap]
        hist.append(x)
    return model.heads(x.mean(1))


@pytest.mark.parametrize("kw", [dict(), dict(ratio="3:1"), dict(ic_mode="pre_mask", ic_proj="low_rank", ic_rank=3),
                                dict(glob="g", ic_proj="dense"), dict(glob="u", ic_mode="none")])
def test_split_execution_matches_masked_mixing_oracle(kw):
    model = make(**kw)
    b = batch(9, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(b).logits_BK, reference_masked_forward(model, b), rtol=0, atol=1e-10)


def rankmixer_oracle(model, b):
    """Post-LN RankMixer block with the user-head mask on full (B, T, D) tensors."""
    from recmix.models.mixing import mix

    B, T, Tu, D = b["item_id"].shape[0], model.T, model.Tu, model.D
    S = D // T
    fu = model.user_encoder({n: b[n] for n in model.user_names})
    fg = model.cand_encoder({n: b[n] for n in model.cand_names})
    x = model.cand_tokenizer(torch.cat([fg[n] for n in model.cand_names], -1))
    if Tu:
        x = torch.cat([model.user_tokenizer(torch.cat([fu[n] for n in model.user_names], -1)), x], 1)
    for l, blk in enumerate(model.blocks):
        if not Tu:  # zero user tokens: the plain RankMixer block with the same weights
            x = blk(x)
            continue
        m = mix(x, T).reshape(B, T, T, S)
        pre = m.clone()
        m[:, :Tu, Tu:] = 0
        m = m.reshape(B, T, D)
        if model.ic is not None:
            m = torch.cat([m[:, :Tu], m[:, Tu:] + model.ic[l](pre[:, :Tu].reshape(B, Tu, -1), x[:, Tu:])], 1)
        s = blk.norm1(m + x)
        x = blk.norm2(blk.ffn(s) + s)
    return model.heads(x.mean(1))


@pytest.mark.parametrize("kw", [dict(), dict(ratio="3:1", ic_mode="pre_mask", ic_proj="dense"), dict(n_user_tokens=0)])
def test_rankmixer_split_execution_matches_oracle(kw):
    model = make(backbone="rankmixer", **kw)
    b = batch(9, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model(b).logits_BK, rankmixer_oracle(model, b), rtol=0, atol=1e-10)


def test_permuting_and_duplicating_candidates():
    model = make(ratio="1:1")
    users = batch(1, seed=3)
    cands = batch(8, seed=4)
    state = model.encode_user({n: users[n] for n in model.user_names})
    c = {n: cands[n] for n in model.cand_names}
    idx = torch.zeros(8, dtype=torch.long)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    dup = torch.tensor([0, 1, 1, 2, 0, 3, 3, 3])
    with torch.no_grad():
        s = model.score(state, c, idx).logits_BK
        sp = model.score(state, {n: v[perm] for n, v in c.items()}, idx).logits_BK
        sd = model.score(state, {n: v[dup] for n, v in c.items()}, idx).logits_BK
        single = torch.cat([model.score(state, {n: v[i:i + 1] for n, v in c.items()}, idx[:1]).logits_BK for i in range(8)])
    torch.testing.assert_close(sp, s[perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(sd, s[dup], rtol=0, atol=1e-12)
    assert torch.equal(sd[1], sd[2]) and torch.equal(sd[5], sd[7])
    torch.testing.assert_close(single, s, rtol=0, atol=1e-12)


def test_unique_users_groups_identical_user_features():
    b = batch(6)
    names = ["user_id", "zip_prefix", "hist_items"]
    for n in names:
        b[n][3] = b[n][0]
        b[n][5] = b[n][0]
    first, inv = unique_users(b, names)
    assert inv[0] == inv[3] == inv[5] and len(first) == 4
    assert torch.equal(first[inv], torch.tensor([0, 1, 2, 0, 4, 0]))


def test_every_parameter_gets_a_gradient_and_training_reduces_loss():
    model = make(ic_mode="masked_off", down=0.5).float().train()
    b = toy_batch(toy_schema(), 32, 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(b)
        loss, _ = model.loss(out, b["labels"])
        opt.zero_grad()
        loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
            assert not missing, missing
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match=r"user_tokens 3:1 does not split n_tokens \(6\)"):
        UGSepConfig(user_tokens="3:1").n_user_tokens(6)
    with pytest.raises(ValueError, match=r"user_tokens \(4\) must be below n_tokens \(4\)"):
        model_cfg(T=4, n_user_tokens=4)
    with pytest.raises(ValueError, match="user_tokens"):
        UGSepConfig(user_tokens="3-1")
    with pytest.raises(ValueError, match="ic_rank is used by ic_proj low_rank only"):
        UGSepConfig(ic_rank=4)
    with pytest.raises(ValueError, match=r"user heads n_heads\*T_u/n_tokens = 6\*3/4"):
        make(T=4, D=12, H=6, ratio="3:1")
    with pytest.raises(ValueError, match="ugsep tokenizes each side with chunk_per_token"):
        TypeAdapter(ModelConfig).validate_python(dict(arch="tokenmixer_large", tokenizer="group_mlp", n_tokens=4, ugsep={}))


@pytest.mark.parametrize("kw", [dict(), dict(ratio="3:1"), dict(ic_mode="none", ratio="1:1"),
                                dict(backbone="rankmixer", ratio="3:1")])
@pytest.mark.parametrize("C", [1, 7, 64])
def test_flops_counter_matches_issued_work_and_formula(kw, C):
    from recmix.kernels.pertoken_dispatch import count_flops
    from recmix.models.ugsep_counters import request_flops

    model = make(T=4, D=16, **kw)
    users, cands = batch(1, seed=1), batch(C, seed=2)
    with torch.no_grad(), count_flops() as issued:
        state = model.encode_user({n: users[n] for n in model.user_names})
        model.score(state, {n: cands[n] for n in model.cand_names}, torch.zeros(C, dtype=torch.long))
    f = request_flops(model, C)
    assert issued[0] == f["ugsep_backbone"] + f["tokenizer"]
    rho = model.Tu / model.T
    assert f["ratio"] == pytest.approx((1 - rho) + rho / C + f["ic"] / f["baseline_backbone"], rel=1e-12)
    assert f["ratio"] == pytest.approx(f["formula"], rel=1e-12)
    base = make(T=4, D=16, backbone=kw.get("backbone", "tokenmixer_large"), n_user_tokens=0)
    with torch.no_grad(), count_flops() as full:
        base({n: users[n].expand(C, *users[n].shape[1:]) if n in model.user_names else cands[n] for n in cands if n != "labels"})
    assert full[0] - request_flops(base, C)["tokenizer"] == f["baseline_backbone"]


@pytest.mark.parametrize("kw", [dict(), dict(glob="g", ratio="3:1"), dict(glob="u", ic_proj="dense"),
                                dict(ic_proj="low_rank", ic_rank=3, ic_mode="pre_mask"), dict(n_user_tokens=0, glob="g"),
                                dict(backbone="rankmixer")])
def test_config_counter_matches_module_parameters(kw):
    from recmix.models import counters

    model = make(**kw)
    emb = sum(p.numel() for p in model.encoder.lookup.parameters())
    c = counters.model(model_cfg(**kw), toy_schema())
    assert c["embedding_params"] == emb
    assert c["dense"]["params"] == sum(p.numel() for p in model.parameters()) - emb


def test_w8a16_quantized_ugsep_keeps_purity_and_split_execution():
    """After PTQ every per-token bank range runs through the W8A16 dispatcher (forward_banks)."""
    import copy

    from recmix.models.quantize import W8A16PerTokenLinear, quantize_model

    model = make(ratio="1:1").float()
    q = quantize_model(copy.deepcopy(model))
    assert sum(isinstance(m, W8A16PerTokenLinear) for m in q.modules()) >= 4 * len(q.blocks)
    users, cands = batch(3, seed=11), batch(12, seed=12)
    for b in (users, cands):
        b["score"] = b["score"].float()
    user_index = torch.tensor([0, 1, 2] * 4)
    full = {n: users[n][user_index] for n in q.user_names} | {n: cands[n] for n in q.cand_names}
    with torch.no_grad():
        split = q.score(q.encode_user({n: users[n] for n in q.user_names}),
                        {n: cands[n] for n in q.cand_names}, user_index).logits_BK
        torch.testing.assert_close(q(full).logits_BK, split, rtol=1e-5, atol=1e-5)
        ref = model(full).logits_BK
        assert float((split - ref).abs().max()) <= 1e-2 * float(ref.abs().max().clamp_min(1.0))
        changed = dict(full)
        changed["item_id"] = (full["item_id"] + 1) % 40
        x1 = q.encode_user({n: full[n] for n in q.user_names}).x_U
        x2 = q.encode_user({n: changed[n] for n in q.user_names}).x_U
    assert all(torch.equal(a, c) for a, c in zip(x1, x2))
