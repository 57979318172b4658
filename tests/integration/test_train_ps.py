"""Training with the sparse tables in parameter-server shards (`embedding:` in the train spec)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from recmix.platform.specs.job import JOB_ADAPTER

from tests.unit.test_train import tiny_dataset  # noqa: F401  (module fixture: a prepared tiny dataset)

# The tables are the dataset schema's (hist_items shares item_id's); only an override is written here.
OVERRIDES = {"hour": {"initializer": {"kind": "uniform", "low": -0.05, "high": 0.05}}}


def spec(uri, out, **emb):
    return JOB_ADAPTER.validate_python(dict(
        kind="train", dataset=dict(uri=uri), output=str(out), epochs=3, batch_size=64, seed=0, threads=1,
        optimizer=dict(name="adamw", lr=0.01), early_stopping=dict(patience=1),
        model=dict(arch="tokenmixer_large", d_model=16, n_heads=4, n_layers=2),
        embedding={**dict(name="trainps", tables=OVERRIDES, shards=2, optimizer={"kind": "rowwise_adagrad", "lr": 0.1},
                          lmdb_path=str(out / "lmdb")), **emb}))


@pytest.mark.parametrize("knob", [{"mode": "pass"}, {"hbm_rows": 1024}, {"tables": {"hour": {"dim": 8}}}])
def test_lookup_knobs_and_table_dims_are_not_train_spec_fields(tmp_path, knob):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        spec("x", tmp_path, **knob)


@pytest.mark.slow
def test_train_with_parameter_server_tables(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    import ray

    from recmix.jobs.train import train

    res = train(spec(tiny_dataset, tmp_path / "run"), log=lambda s: None)
    model = res.model
    # The model holds no embedding table: every sparse row lives in the shards.
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    assert res.test["auc"] > 0.6, res.test          # the planted rule is learnable through the PS
    manifest = json.loads((tmp_path / "run" / "embeddings" / "manifest.json").read_text())
    assert manifest["shards"] == 2 and manifest["rows"]["item_id"] > 0 and manifest["rows"]["hour"] == 24
    assert set(manifest["tables"]) == {"user_id", "zip_prefix", "item_id", "genres", "hour"}   # hist_items -> item_id
    # The shard actors were stopped after the checkpoint.
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "trainps" in str(a)]
    assert not alive


@pytest.mark.slow
def test_ray_train_two_workers_share_one_shard_group_and_publish_the_rows(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    """2 Ray Train workers attach to the driver's group; the artifact's row snapshot reproduces the test AUC."""
    import ray

    from recmix.jobs.train import run
    from recmix.jobs.train.score import score
    from recmix.models.artifact import load_artifact

    out = tmp_path / "run"
    s = spec(tiny_dataset, out).model_dump(mode="json", exclude_unset=True)
    s.update(epochs=2, scaling={"workers": 2}, checkpoint={"every_steps": 20})
    summary = run(JOB_ADAPTER.validate_python(s), log=lambda line: None)
    assert summary["world_size"] == 2 and summary["test"]["auc"] > 0.6, summary["test"]
    model = load_artifact(str(out / "artifact"))
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())   # rows come from the snapshot
    res = score(str(out / "artifact"), str(tiny_dataset), echo=lambda line: None)
    assert abs(res["auc"] - summary["test"]["auc"]) < 1e-6, (res, summary["test"])
    # every checkpoint carries the shards' snapshot tied to it; the driver destroyed the group at the end
    cks = sorted((out / "checkpoints" / "train").glob("checkpoint-*"))
    assert cks and all((c / "ps" / "snapshot.json").exists() for c in cks)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "trainps" in str(a)]
