"""LMN with local tables on Ray Train: the DDP workers train the memory values inside the model, and the
artifact carries them (the parameter-server case is in test_lmn_ray.py)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_train import tiny_dataset  # noqa: F401  (module fixture: a prepared tiny dataset)

MEMORY = dict(n_sub=6, d_key=8, d_value=4, k_axis=3, top_k=3, user_features=["user_id"], side_sequences=[],
              lambda_mem=0.5)


@pytest.mark.slow
def test_ray_train_with_local_memory_values_publishes_them(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    from recmix.jobs.train import run
    from recmix.jobs.train.score import score
    from recmix.models.artifact import load_artifact
    from recmix.models.build import build_model
    from recmix.models.lmn import VALUE_TABLE
    from recmix.models.toy import toy_schema
    from recmix.platform.specs.job import JOB_ADAPTER

    out = tmp_path / "run"
    spec = JOB_ADAPTER.validate_python(dict(
        kind="train", dataset=dict(uri=str(tiny_dataset)), output=str(out), epochs=1, batch_size=64, seed=0, threads=1,
        optimizer=dict(name="adamw", lr=0.01, weight_decay=0.0), scaling=dict(workers=2),
        model=dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_heads=4, n_layers=2, memory=MEMORY)))
    summary = run(spec, log=lambda line: None)
    assert summary["world_size"] == 2
    model = load_artifact(str(out / "artifact"))
    values = model.encoder.lookup.emb[VALUE_TABLE].weight.detach()
    torch.manual_seed(0)                       # the workers' seed before build_model: the initial values
    init = build_model(spec.model, toy_schema()).encoder.lookup.emb[VALUE_TABLE].weight.detach()
    moved = (values != init).any(1)
    assert moved.any(), "no value row trained"
    res = score(str(out / "artifact"), str(tiny_dataset), echo=lambda line: None)
    assert abs(res["auc"] - summary["test"]["auc"]) < 1e-6, (res, summary["test"])
