"""`quantize: w8a16` in a train spec: the artifact carries W8A16 weights beside the float ones, and
`load_artifact(quant="w8a16")` serves them (spec: Ray Train issue, the model artifact)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from pydantic import TypeAdapter

from recmix.jobs.train import artifact
from recmix.models.artifact import load_artifact
from recmix.models.build import build_model
from recmix.models.quantize import W8A16PerTokenLinear
from recmix.models.toy import toy_batch, toy_schema
from recmix.platform.errors import RecmixError
from recmix.platform.specs.model import ModelConfig
from recmix.platform.specs.train import TrainSpec

MODEL = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=4, d_model=16,
             n_layers=2, ffn_mult=2.0, ugsep={"user_tokens": "1:1"})


def _publish(tmp_path, quantize):
    spec = TrainSpec.model_validate(dict(kind="train", dataset={"uri": str(tmp_path / "data")}, model=MODEL,
                                         output=str(tmp_path / "run"), **({"quantize": quantize} if quantize else {})))
    torch.manual_seed(0)
    model = build_model(TypeAdapter(ModelConfig).validate_python(MODEL), toy_schema())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    artifact.publish(spec, "v1", toy_schema(), model.state_dict(), {"test": {"auc": 0.5}}, None)
    return str(tmp_path / "run" / "artifact"), model.eval()


def test_the_artifact_carries_w8a16_weights_that_load_and_score_close_to_float(tmp_path):
    root, ref = _publish(tmp_path, {"granularity": "per_channel"})
    doc = json.load(open(os.path.join(root, "v1", "artifact.json")))
    assert doc["w8a16"] == "w8a16.pt" and os.path.isfile(os.path.join(root, "v1", "w8a16.pt"))
    q = load_artifact(root, quant="w8a16")
    assert any(isinstance(m, W8A16PerTokenLinear) for m in q.modules())
    f = load_artifact(root)
    assert not any(isinstance(m, W8A16PerTokenLinear) for m in f.modules())
    b = toy_batch(toy_schema(), 64, seed=3)
    with torch.no_grad():
        s_ref, s_f, s_q = (torch.sigmoid(m(b).logits_BK) for m in (ref, f, q))
    torch.testing.assert_close(s_f, s_ref)
    diff = (s_q - s_f).abs().max().item()
    assert 0 < diff < 2e-2, diff    # int8 per-channel weights: close to float, but really quantized


def test_asking_for_w8a16_weights_an_artifact_lacks_is_one_clear_error(tmp_path):
    root, _ = _publish(tmp_path, None)
    with pytest.raises(RecmixError, match="no W8A16 weights"):
        load_artifact(root, quant="w8a16")
    with pytest.raises(ValueError, match="quant must be"):
        load_artifact(root, quant="int4")
