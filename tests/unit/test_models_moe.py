"""S-P MoE, ReLU/DTSI MoE and the counters (spec §7 invariants 7-9, 11, 12, 14)."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter
from torch.utils.flop_counter import FlopCounterMode

from recmix.models import counters
from recmix.models.build import build_model
from recmix.models.moe import SparsePertokenMoE
from recmix.models.token_layers import PerTokenSwiGLU
from recmix.models.relu_moe import ReLURoutedMoE
from recmix.models.toy import toy_schema
from recmix.platform.specs.model import PRESETS, ModelConfig, MoECompute, SPMoEConfig, ReLUMoEConfig, preset

CFG = TypeAdapter(ModelConfig)


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_from_experts(moe: SparsePertokenMoE) -> PerTokenSwiGLU:
    """The dense pSwiGLU whose hidden units are [routed experts of bank p ..., shared expert of p]."""
    P, W, F, Er = moe.n_pos, moe.width, moe.expert_hidden, moe.n_routed
    w_in = moe.experts.w_in.weight.reshape(P, Er, W, 2 * F)
    w_out = moe.experts.w_out.weight.reshape(P, Er, F, W)
    gates = [w_in[:, e, :, :F] for e in range(Er)] + [moe.shared.w_in.weight[..., :F]]
    ups = [w_in[:, e, :, F:] for e in range(Er)] + [moe.shared.w_in.weight[..., F:]]
    downs = [w_out[:, e] for e in range(Er)] + [moe.shared.w_out.weight]
    dense = PerTokenSwiGLU(P, W, F * (Er + 1)).double()
    with torch.no_grad():
        dense.w_in.weight.copy_(torch.cat([torch.cat(gates, -1), torch.cat(ups, -1)], -1))
        dense.w_out.weight.copy_(torch.cat(downs, 1))
    return dense


@pytest.mark.parametrize("compute", ["grouped", "dense_masked"])
def test_expert_split_identity(compute):
    """All E-1 routed experts on, uniform gates 1/(E-1) (zero router), alpha = E-1: MoE == dense pSwiGLU."""
    torch.manual_seed(0)
    E = 4
    cfg = SPMoEConfig(n_experts=E, n_active=E, alpha=E - 1, compute=compute)
    moe = SparsePertokenMoE(3, 6, 16, cfg, down_scale=1.0).double()
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(moe(x)[0], _dense_from_experts(moe)(x), atol=1e-12, rtol=1e-10)
    # default alpha = E/K = 1 with K = E does not reproduce the dense layer
    moe.alpha = cfg.model_copy(update={"alpha": None}).gate_alpha
    assert not torch.allclose(moe(x)[0], _dense_from_experts(moe)(x))


def test_grouped_equals_dense_masked_and_routing_counts():
    torch.manual_seed(1)
    cfg = SPMoEConfig(n_experts=8, n_active=4)
    moe = SparsePertokenMoE(4, 8, 32, cfg, down_scale=1.0).double()
    x = torch.randn(64, 4, 8, dtype=torch.float64)
    y_grouped, balance = moe(x)
    assert balance is None                                         # balance_loss none
    moe.compute = MoECompute.dense_masked
    torch.testing.assert_close(y_grouped, moe(x)[0], atol=1e-12, rtol=1e-10)
    _, gate_BPK, idx_BPK = moe.route(x)
    assert idx_BPK.shape[-1] == 3                                  # K - 1 routed experts
    assert torch.equal(idx_BPK.sort(-1).values.unique_consecutive(dim=-1).shape[-1] * torch.ones(1), torch.tensor([3.0]))
    torch.testing.assert_close(gate_BPK.sum(-1), torch.ones(64, 4, dtype=torch.float64))
    assert moe.last_usage_PE.shape == (4, 7)
    torch.testing.assert_close(moe.last_usage_PE.sum(-1), torch.ones(4, dtype=torch.float64))


def test_grouped_moe_gradients_match_dense_masked():
    torch.manual_seed(2)
    moe = SparsePertokenMoE(2, 4, 16, SPMoEConfig(n_experts=4, n_active=2), down_scale=1.0).double()
    x = torch.randn(16, 2, 4, dtype=torch.float64)
    grads = []
    for mode in MoECompute:
        moe.zero_grad()
        moe.compute = mode
        moe(x)[0].square().sum().backward()
        grads.append([p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def _block_params(model) -> int:
    return sum(p.numel() for p in model.blocks.parameters())


@pytest.mark.parametrize("T_heads,mode,tokenizer", [(4, "B", "group_mlp"), (8, "B", "chunk_per_token"), (2, "C", "group_mlp"),
                                                    (8, "A", "chunk_per_token")])
def test_tokenmixer_param_count_formula(T_heads, mode, tokenizer):
    D, n, L = 16, 2.0, 3
    cfg = CFG.validate_python(dict(arch="tokenmixer_large", tokenizer=tokenizer, d_model=D, n_heads=T_heads, n_layers=L,
                                   ffn_mult=n, residual_mode=mode))
    model = build_model(cfg, toy_schema())
    T, H = model.n_tokens, model.n_heads
    norms = 2 * D if mode != "A" else T * D // H + D
    assert _block_params(model) == L * (int(3 * n * T * D * D * (T / H + 1)) + norms)
    assert counters.backbone(cfg, T).params == _block_params(model)
    dense = counters.model(cfg, toy_schema())["dense"]["params"]
    assert dense == sum(p.numel() for p in model.parameters()) - counters.embeddings(toy_schema())


def test_rankmixer_param_count_formula_and_presets():
    T, D, k, L = 4, 16, 3.0, 2
    cfg = CFG.validate_python(dict(arch="rankmixer", n_tokens=T, d_model=D, ffn_mult=k, n_layers=L))
    model = build_model(cfg, toy_schema())
    pffn = sum(p.numel() for b in model.blocks for p in b.ffn.parameters())
    assert pffn == L * T * int(2 * k * D * D + k * D + D)
    assert counters.backbone(cfg, T).params == _block_params(model) == pffn + L * 4 * D
    assert counters.model(cfg, toy_schema())["dense"]["params"] == sum(p.numel() for p in model.parameters()) - counters.embeddings(toy_schema())
    for name in ("rankmixer_100m", "rankmixer_1b"):
        c = preset(name)
        approx = 2 * c.ffn_mult * c.n_layers * c.n_tokens * c.d_model ** 2
        assert abs(counters.backbone(c, c.n_tokens).params - approx) / approx < 0.01
    sizes = {name: counters.backbone(preset(name), preset(name).n_tokens).params for name in PRESETS}
    assert 0.09e9 < sizes["rankmixer_100m"] < 0.11e9 and 1.0e9 < sizes["rankmixer_1b"] < 1.2e9
    assert 0.45e9 < sizes["tokenmixer_large_500m"] < 0.55e9 and 4.3e9 < sizes["tokenmixer_large_4b"] < 4.9e9
    assert 7.2e9 < sizes["tokenmixer_large_7b"] < 8.0e9


@pytest.mark.parametrize("arch", ["tokenmixer_large", "rankmixer"])
def test_flop_counter_equals_torch_flop_count(arch):
    """Forward FLOPs of the blocks per sample == 2 x matmul params (torch's FlopCounterMode counts bmm)."""
    extra = dict(n_heads=8) if arch == "tokenmixer_large" else dict(n_tokens=4)
    cfg = CFG.validate_python(dict(arch=arch, d_model=16, n_layers=2, ffn_mult=2.0, **extra))
    model = build_model(cfg, toy_schema()).eval()
    T = model.n_tokens
    x = torch.randn(10, T, 16)
    with FlopCounterMode(display=False) as fc:
        for blk in model.blocks:
            x = blk(x)
    assert fc.get_total_flops() == 10 * counters.backbone(cfg, T).flops


def test_flop_counter_half_at_sparsity_1_2():
    base = dict(arch="tokenmixer_large", d_model=64, n_heads=8, n_layers=2, ffn_mult=4.0, tokenizer="chunk_per_token",
                global_token="none", n_tokens=16)
    dense = counters.backbone(CFG.validate_python(base), 16)
    sparse = counters.backbone(CFG.validate_python({**base, "moe": dict(n_experts=8, n_active=4)}), 16)
    assert sparse.params > dense.params                 # routers only
    ratio = sparse.flops / dense.flops
    assert 0.5 <= ratio < 0.53, ratio                   # half the FFN FLOPs + the routers
    # exactly 2 x active matmul params
    assert sparse.flops == 2 * (sparse.active_params - 2 * 2 * 64)


def test_dtsi_eval_depends_only_on_h_infer_and_counts_active():
    torch.manual_seed(3)
    moe = ReLURoutedMoE(4, 8, 16, ReLUMoEConfig(n_experts=4)).double().eval()
    x = torch.randn(32, 4, 8, dtype=torch.float64)
    y, reg = moe(x)
    assert reg is None                      # the routing regulariser is a training term
    with torch.no_grad():
        moe.h_train.weight.add_(torch.randn_like(moe.h_train.weight))
    assert torch.equal(moe(x)[0], y)
    # sparse inference equals the dense gated sum with the infer gates
    g = torch.relu(moe.h_infer(x))
    dense = moe.experts(x.unsqueeze(2).expand(32, 4, 4, 8).reshape(32, 16, 8)).reshape(32, 4, 4, 8)
    torch.testing.assert_close(y, (dense * g.unsqueeze(-1)).sum(2), atol=1e-12, rtol=1e-10)
    assert 0 < moe.last_active_ratio < 1


def test_relu_moe_lambda_drives_active_ratio_down():
    torch.manual_seed(4)
    moe = ReLURoutedMoE(2, 8, 16, ReLUMoEConfig(n_experts=4, target_active_ratio=0.25, lambda_init=1e-3))
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    x = torch.randn(256, 2, 8)
    for _ in range(150):
        opt.zero_grad()
        out, reg = moe(x)
        (out.square().mean() * 0 + reg).backward()
        opt.step()
    assert moe.last_active_ratio < 0.35, moe.last_active_ratio


@pytest.mark.parametrize("moe", [
    dict(n_experts=4, n_active=2), dict(n_experts=4, n_active=2, positions="mixed", shared_expert="full"),
    dict(n_experts=4, n_active=3, positions="token", shared_expert="none"),
])
def test_moe_param_and_active_counts(moe):
    cfg = CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=2, ffn_mult=2.0, moe=moe))
    model = build_model(cfg, toy_schema())
    c = counters.backbone(cfg, model.n_tokens)
    assert c.params == _block_params(model)
    # active = params - inactive routed experts
    inactive = 0
    for b in model.blocks:
        for m in b.moe_layers():
            per_expert = m.experts.w_in.weight[0].numel() + m.experts.w_out.weight[0].numel()
            inactive += m.n_pos * (m.n_routed - m.k_routed) * per_expert
    assert c.active_params == c.params - inactive


@pytest.mark.parametrize("moe", [dict(n_experts=4), dict(n_experts=4, expert_hidden="fine", dtsi="off")])
def test_relu_moe_param_count(moe):
    cfg = CFG.validate_python(dict(arch="rankmixer", n_tokens=4, d_model=16, ffn_mult=2.0, moe=moe))
    model = build_model(cfg, toy_schema())
    assert counters.backbone(cfg, 4).params == _block_params(model)


def test_routing_losses_travel_in_the_model_output():
    from recmix.models.toy import toy_batch

    b = toy_batch(toy_schema(), 16, seed=0)
    tml = build_model(CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=2,
                                               moe=dict(n_experts=4, n_active=2, balance_loss="switch"))), toy_schema())
    out = tml(b)
    assert out.extra_loss is not None and out.extra_loss.requires_grad
    assert tml.loss(out, b["labels"])[1]["routing"] == pytest.approx(float(out.extra_loss.detach()))
    rm = build_model(CFG.validate_python(dict(arch="rankmixer", n_tokens=4, d_model=16, moe=dict(n_experts=4))), toy_schema())
    assert rm.train()(b).extra_loss is not None and rm.eval()(b).extra_loss is None   # L1/DTSI terms train only
    for m in (tml, rm):
        assert not any(hasattr(mod, "last_balance_loss") or hasattr(mod, "last_reg") for mod in m.modules())
