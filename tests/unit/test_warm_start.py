"""`init_from`: a run starts from another run's weights; S-P MoE layers start as the dense pSwiGLU split into
experts ("first enlarge, then sparse", TokenMixer-Large §3.4)."""

from __future__ import annotations

import io

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from recmix.jobs.train import warm_start
from recmix.models.build import build_model
from recmix.models.moe import SparsePertokenMoE
from recmix.models.toy import toy_batch, toy_schema
from recmix.models.warm_start import warm_state
from recmix.platform.errors import RecmixError
from recmix.platform.specs.model import ModelConfig
from recmix.platform.specs.job import JOB_ADAPTER

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TypeAdapter(ModelConfig)
DENSE = dict(arch="tokenmixer_large", d_model=16, n_heads=4, ffn_mult=2.0)


def _models(moe: dict):
    schema = toy_schema()
    torch.manual_seed(0)
    dense = build_model(CFG.validate_python(DENSE), schema).double().eval()
    torch.manual_seed(1)
    sparse = build_model(CFG.validate_python({**DENSE, "moe": moe}), schema).double().eval()
    return schema, dense, sparse


@pytest.mark.parametrize("positions", ["both", "mixed", "token"])
def test_split_experts_reproduce_the_dense_model(positions):
    """Every routed expert on, zero routers (uniform gates) and alpha = E_r: the warm-started MoE model scores
    exactly as the dense model it was split from, so each expert got whole hidden units of its own bank."""
    E = 4
    schema, dense, sparse = _models(dict(n_experts=E, n_active=E, alpha=E - 1, positions=positions))
    state, split = warm_state(sparse, dense.state_dict())
    sparse.load_state_dict(state)
    moes = [m for m in sparse.modules() if isinstance(m, SparsePertokenMoE)]
    n_layers = CFG.validate_python(DENSE).n_layers
    assert len(moes) == len(split) == n_layers * (2 if positions == "both" else 1)   # F1 and/or F2 of every block
    with torch.no_grad():
        for m in moes:
            m.router.weight.zero_()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in toy_batch(schema, 32).items()}
    torch.testing.assert_close(sparse(batch).logits_BK, dense(batch).logits_BK, atol=1e-10, rtol=1e-8)
    # the routed experts and the shared one are distinct slices: a permuted split would not reproduce it
    m = moes[0]
    assert not torch.equal(m.experts.w_in.weight[0], m.experts.w_in.weight[1])


def test_sparse_start_keeps_the_router_and_differs_from_dense_only_in_the_experts():
    schema, dense, sparse = _models(dict(n_experts=4, n_active=2))
    router_before = {k: v.clone() for k, v in sparse.state_dict().items() if ".router." in k}
    state, _ = warm_state(sparse, dense.state_dict())
    sparse.load_state_dict(state)
    for k, v in router_before.items():
        assert torch.equal(sparse.state_dict()[k], v)
    same = [k for k in dense.state_dict() if "f1" not in k and "f2" not in k]
    assert same and all(torch.equal(sparse.state_dict()[k], dense.state_dict()[k]) for k in same)


def test_a_source_that_does_not_fit_is_named():
    schema, dense, sparse = _models(dict(n_experts=4, n_active=2))
    other = build_model(CFG.validate_python({**DENSE, "d_model": 32}), schema)
    with pytest.raises(ValueError, match="do not fit this model: .*shapes differ"):
        warm_state(dense, other.state_dict())
    partial = {k: v for k, v in dense.state_dict().items() if not k.startswith("heads.")}
    with pytest.raises(ValueError, match=r"missing heads\."):
        warm_state(sparse, partial)
    # a MoE with a full-width shared expert is not a split of the dense hidden units
    _, dense, wide = _models(dict(n_experts=4, n_active=2, shared_expert="full"))
    with pytest.raises(ValueError, match="does not split into this S-P MoE"):
        warm_state(wide, dense.state_dict())


def test_read_source_takes_a_run_folder_and_names_a_missing_one(tmp_path):
    _, dense, _ = _models(dict(n_experts=4, n_active=2))
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(buf.getvalue())
    got = warm_start.read_source(str(tmp_path / "run"), JOB_ADAPTER.validate_python(_spec(tmp_path)).storage)
    assert set(got) == set(dense.state_dict())
    with pytest.raises(RecmixError, match="not a model artifact"):
        warm_start.read_source(str(tmp_path / "nowhere"), JOB_ADAPTER.validate_python(_spec(tmp_path)).storage)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"not a pickle")
    with pytest.raises(RecmixError, match="is not a state_dict"):
        warm_start.read_source(str(tmp_path / "bad"), JOB_ADAPTER.validate_python(_spec(tmp_path)).storage)


def _spec(tmp_path, **kw) -> dict:
    return dict(kind="train", dataset=dict(uri=str(tmp_path / "d")), model=DENSE, output=str(tmp_path / "o"), **kw)


def test_init_from_spec_checks():
    with pytest.raises(ValidationError, match="unsupported URI scheme"):
        JOB_ADAPTER.validate_python(dict(kind="train", dataset=dict(uri="x"), model=DENSE, output="o", init_from="ftp://h/x"))
    with pytest.raises(ValidationError, match="init_from needs local embedding tables"):
        JOB_ADAPTER.validate_python(dict(kind="train", dataset=dict(uri="x"), model=DENSE, output="o", init_from="/r",
                                         embedding=dict(shards=2)))
