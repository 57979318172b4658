"""Device-correctness: no tensor inside a model is created on a fixed device.

The model and batch live on the CPU while the default device is `meta`: a tensor made without `device=`
(torch.arange(n), torch.full(...)) lands on `meta`, and the first op mixing it with the CPU tensors raises.
That is what would break on CUDA, where such a tensor would land on the CPU. Where no op can run data-dependent
shapes (torch.unique), this is the equivalent of a full `meta` run.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from recmix.models.build import build_model
from recmix.models.toy import toy_batch, toy_schema
from recmix.platform.specs.model import ModelConfig

UG = dict(tokenizer="chunk_per_token", n_tokens=4, d_model=16, n_layers=2, ffn_mult=2.0)
CONFIGS = {
    "dlrm_mlp": dict(arch="dlrm_mlp", hidden=[16, 8]),
    "rankmixer": dict(arch="rankmixer", tokenizer="chunk_per_token", n_tokens=4, d_model=16, n_layers=2),
    "rankmixer_relu_moe": dict(arch="rankmixer", tokenizer="chunk_per_token", n_tokens=4, d_model=16, n_layers=2,
                               moe=dict(n_experts=4)),
    "tokenmixer_large": dict(arch="tokenmixer_large", tokenizer="group_mlp", global_token="mlp", d_model=16, n_heads=4,
                             n_layers=2, aux_loss=dict(mode="deep_supervision", weight=0.1)),
    "tokenmixer_large_moe": dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=2, moe=dict(n_experts=4, n_active=2)),
    "ugsep_tokenmixer_large": dict(arch="tokenmixer_large", n_heads=4, global_token="mlp", **UG,
                                   ugsep=dict(user_tokens="1:1", global_token_side="candidate")),
    "ugsep_tokenmixer_large_ic_low_rank": dict(arch="tokenmixer_large", n_heads=4, **UG, ugsep=dict(user_tokens="1:1", ic_mode="pre_mask", ic_proj="low_rank", ic_rank=4)),
    "ugsep_rankmixer": dict(arch="rankmixer", **UG, ugsep=dict(user_tokens="1:1")),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_backward_create_no_tensor_on_the_default_device(name):
    torch.manual_seed(0)
    cfg = TypeAdapter(ModelConfig).validate_python(CONFIGS[name])
    model = build_model(cfg, toy_schema())
    b = toy_batch(toy_schema(), 12, seed=1)
    b["user_id"][6:] = b["user_id"][:6]   # repeated users: UG-Sep's unique-user path does real work
    with torch.device("meta"):
        out = model(b)
        loss, _ = model.loss(out, b["labels"])
        loss.backward()
    assert out.logits_BK.device.type == "cpu"
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in model.parameters())


def test_the_check_catches_a_tensor_made_without_a_device():
    x = torch.ones(3)
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        (x + torch.arange(3)).sum().item()
