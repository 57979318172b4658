"""Mix/Revert, per-token layers, config validation, embeddings (spec §7 invariants 1-6, 10, 15, 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from recmix.kernels.pertoken_dispatch import pertoken_linear, pertoken_linear_reference
from recmix.models.build import build_model
from recmix.models.embedding import LocalEmbeddingLookup, TableSpec, bucket_torch
from recmix.models.mixing import mix, revert
from recmix.models.token_layers import PerTokenLinear
from recmix.models.toy import toy_batch, toy_schema
from recmix.platform.hashing import bucket
from recmix.platform.specs.model import ModelConfig

CFG = TypeAdapter(ModelConfig)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("T,D,H", [(4, 8, 2), (5, 12, 3), (16, 64, 16), (3, 16, 8), (7, 6, 1), (2, 24, 24)])
def test_revert_mix_bitwise(T, D, H):
    x = torch.randn(3, T, D)
    y = mix(x, H)
    assert y.shape == (3, H, T * D // H)
    assert torch.equal(revert(y, T), x)
    z = torch.randn(3, H, T * D // H)
    assert torch.equal(mix(revert(z, T), H), z)


def test_mix_is_permutation_and_involution_when_h_equals_t():
    x = torch.randn(2, 4, 8)
    y = mix(x, 4)
    assert torch.equal(mix(y, 4), x)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    # mixed token h holds slice h of every token, in token order
    assert torch.equal(y[:, 1, 2:4], x[:, 1, 2:4]) and torch.equal(y[:, 1, 0:2], x[:, 0, 2:4])


def test_mix_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        mix(torch.randn(1, 4, 10), 3)


def test_pertoken_matmul_equals_loop_of_linears():
    torch.manual_seed(0)
    T, I, O = 5, 7, 3
    layer = PerTokenLinear(T, I, O, bias=True).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(6, T, I, dtype=torch.float64)
    linears = []
    for t in range(T):
        lin = torch.nn.Linear(I, O).double()
        with torch.no_grad():
            lin.weight.copy_(layer.weight[t].T)
            lin.bias.copy_(layer.bias[t])
        linears.append(lin)
    loop = torch.stack([linears[t](x[:, t]) for t in range(T)], dim=1)
    torch.testing.assert_close(layer(x), loop, atol=1e-12, rtol=0)
    torch.testing.assert_close(pertoken_linear(x, layer.weight, layer.bias), pertoken_linear_reference(x, layer.weight, layer.bias),
                               atol=1e-12, rtol=0)


def test_bucket_torch_matches_numpy_splitmix64():
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 2**63 - 1, 1000, dtype=np.int64), np.array([0, 1, 2**63 - 1, 12345])])
    for n in (1, 7, 1000, 2**31 + 11):
        assert np.array_equal(bucket_torch(torch.from_numpy(ids), n).numpy(), bucket(ids, n))


def test_local_lookup_init_and_errors():
    lk = LocalEmbeddingLookup({"a": TableSpec("a", 1000, 16, False), "h": TableSpec("h", 10, 4, True)}, init_std=0.01)
    assert 0.005 < float(lk.emb["a"].weight.detach().std()) < 0.015
    assert lk.lookup("h", torch.tensor([[10**15, 3]])).shape == (1, 2, 4)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        lk.lookup("a", torch.tensor([1000]))


def test_sequence_pooling_masks_padding():
    schema = toy_schema()
    model = build_model(CFG.validate_python(dict(arch="dlrm_mlp")), schema)
    b = toy_batch(schema, 4)
    b["hist_items"] = torch.tensor([[1, 2, -1, -1, -1, -1], [3, -1, -1, -1, -1, -1], [-1] * 6, [1, 2, 3, 4, 5, 6]])
    feats = model.encoder(b)
    table = model.encoder.lookup.emb["item_id"].weight
    torch.testing.assert_close(feats["hist_items"][0], table[[1, 2]].mean(0))
    torch.testing.assert_close(feats["hist_items"][2], torch.zeros(8))


@pytest.mark.parametrize("bad,msg", [
    (dict(arch="rankmixer", n_tokens=4, n_heads=2, d_model=16), "n_heads == n_tokens"),
    (dict(arch="tokenmixer_large", d_model=16, n_heads=3), "must divide d_model"),
    (dict(arch="rankmixer", n_tokens=3, d_model=16), "must divide d_model"),
    (dict(arch="tokenmixer_large", d_model=16, moe=dict(n_experts=4, n_active=5)), "n_active"),
    (dict(arch="tokenmixer_large", d_model=16, n_layers=2, aux_loss=dict(layers=[2])), "below n_layers"),
    (dict(arch="tokenmixer_large", d_model=16, bogus=1), "Extra inputs"),
])
def test_config_validation(bad, msg):
    with pytest.raises(ValidationError, match=msg):
        CFG.validate_python(bad)


@pytest.mark.parametrize("given,want", [
    (dict(), ("chunk_per_token", "none", 16)),                       # the measured default: chunk tokens, T = 16
    (dict(tokenizer="group_mlp"), ("group_mlp", "mlp", None)),        # the spec's: T from the schema
    (dict(tokenizer="chunk_shared"), ("chunk_shared", "none", 16)),
    (dict(tokenizer="group_mlp", global_token="none", n_tokens=4), ("group_mlp", "none", 4)),   # given values kept
    (dict(n_tokens=8, ugsep=dict(user_tokens="1:1")), ("chunk_per_token", "none", 8)),
    (dict(global_token="mlp", ugsep=dict(user_tokens="1:1")), ("chunk_per_token", "mlp", 16)),
])
def test_tokenmixer_large_token_defaults_follow_the_tokenizer(given, want):
    cfg = CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, **given))
    assert (cfg.tokenizer.value, cfg.global_token.value, cfg.n_tokens) == want
    # an artifact's stored config reads back as trained: the set fields, and the full dump
    for dump in (cfg.model_dump(mode="json", exclude_unset=True), cfg.model_dump(mode="json")):
        again = CFG.validate_python(dump)
        assert (again.tokenizer.value, again.global_token.value, again.n_tokens) == want


@pytest.mark.parametrize("bad,msg", [
    (dict(global_token="mlp"), "global_token mlp is built by the group_mlp tokenizer only"),
    (dict(tokenizer="chunk_shared", n_tokens=None), "tokenizer chunk_shared needs n_tokens"),
    (dict(tokenizer="bogus"), "tokenizer"),
])
def test_tokenmixer_large_token_errors(bad, msg):
    with pytest.raises(ValidationError, match=msg):
        CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, **bad))


def test_artifact_written_under_the_group_mlp_default_loads_as_group_mlp(tmp_path):
    """Before chunk tokens became the default an artifact's `model` (the fields the spec set) had no tokenizer;
    `model_resolved` pins the one it was trained with, so the weights load strictly."""
    import json

    from recmix.models import artifact as fmt
    from recmix.models.artifact import load_artifact

    given = dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=2)
    trained = CFG.validate_python({**given, "tokenizer": "group_mlp"})
    model = build_model(trained, toy_schema())
    torch.save(model.state_dict(), tmp_path / fmt.DENSE)
    doc = {"format": fmt.FORMAT, "model": given, "model_resolved": trained.model_dump(mode="json"),
           "features": toy_schema().model_dump(mode="json"), "dense": fmt.DENSE, "embeddings": None}
    (tmp_path / fmt.DOC).write_text(json.dumps(doc))
    loaded = load_artifact(str(tmp_path))
    assert loaded.n_tokens == 5 and fmt.model_config(doc) == trained
    assert fmt.model_config({"model": given}).tokenizer.value == "chunk_per_token"   # a new spec: the new default


def test_group_mlp_token_count_checked():
    with pytest.raises(ValueError, match="group_mlp gives 5 tokens"):
        build_model(CFG.validate_python(dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_tokens=4,
                                              n_heads=4)), toy_schema())
    # T = 5 comes from the schema: the config's check_tokens runs at build time, with the same message
    with pytest.raises(ValueError, match=r"n_heads defaults to n_tokens \(5\), which must divide d_model \(16\)"):
        build_model(CFG.validate_python(dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16)), toy_schema())
    with pytest.raises(ValueError, match=r"ffn_mult \* mixed-token width T\*D/H = 1.5 \* 5"):
        build_model(CFG.validate_python(dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_heads=16,
                                              ffn_mult=1.5)), toy_schema())


@pytest.mark.parametrize("bad,msg", [
    (dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=4, d_model=16,
          moe=dict(n_experts=4, n_active=2), ugsep={}), "ugsep with moe"),
    (dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=4, d_model=16,
          residual_mode="A", ugsep={}), "residual_mode B, got A"),
    (dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=4, d_model=16,
          ffn_mult=2.5, moe=dict(n_experts=3, n_active=2)),
     r"moe.n_experts \(3\) must divide the mixed pSwiGLU hidden width ffn_mult\*16 \(40\)"),
    (dict(arch="tokenmixer_large", d_model=16, ffn_mult=1.03), r"ffn_mult \* d_model = 1.03 \* 16"),
])
def test_constructor_checks_live_in_the_config(bad, msg):
    with pytest.raises(ValidationError, match=msg):
        CFG.validate_python(bad)


@pytest.mark.parametrize("mode", ["A", "B", "C"])
def test_zero_down_init_blocks_are_identity(mode):
    cfg = CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, n_heads=4, residual_mode=mode, down_init_std_scale=0.0,
                                   inter_residual_gap=0))
    model = build_model(cfg, toy_schema()).eval()
    x = torch.randn(3, model.n_tokens, 16)
    for blk in model.blocks:
        assert torch.equal(blk(x), x)


def test_inter_residual_never_targets_last_block_and_mean_pool_readout():
    cfg = CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=4, inter_residual_gap=2,
                                   down_init_std_scale=0.0))
    model = build_model(cfg, toy_schema()).eval()
    x = torch.randn(2, model.n_tokens, 16)
    out = model.backbone(x)[-1]
    # identity blocks: after block 2 the stream is x + x; block 4 is last, so no second skip: 2x, not 3x or 4x
    assert torch.equal(out, x + x)
    b = toy_batch(toy_schema(), 5)
    tokens = model.tokenizer(model.encoder(b))
    last = model.backbone(tokens)[-1]
    assert torch.equal(model(b).logits_BK, model.heads(last.mean(1)))


def test_tokenmixer_large_has_no_biases_in_blocks_and_mix_has_no_params():
    model = build_model(CFG.validate_python(dict(arch="tokenmixer_large", d_model=16, n_heads=8)), toy_schema())
    for name, p in model.blocks.named_parameters():
        assert "bias" not in name, name
    assert model.n_heads == 8 and model.n_tokens == 16   # H decoupled from T (the default T = 16)
