"""Training with the sparse tables in parameter-server shards (`embedding:` in the train spec)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from recmix.platform.specs.job import JOB_ADAPTER

from tests.integration.test_train_ray import assert_same_predictions
from tests.unit.test_train import tiny_dataset  # noqa: F401  (module fixture: a prepared tiny dataset)

# The tables are the dataset schema's (hist_items shares item_id's); only an override is written here.
OVERRIDES = {"hour": {"initializer": {"kind": "uniform", "low": -0.05, "high": 0.05}}}


def spec(uri, out, **emb):
    return JOB_ADAPTER.validate_python(dict(
        kind="train", dataset=dict(uri=uri), output=str(out), epochs=3, batch_size=64, seed=0, threads=1,
        optimizer=dict(name="adamw", lr=0.01), early_stopping=dict(patience=1),
        model=dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_heads=4, n_layers=2),
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
def test_ray_train_two_workers_share_one_shard_group_survive_a_shard_kill_and_publish_the_rows(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    """2 Ray Train workers attach to the driver's group; an embedding shard's process is SIGKILLed after the
    first checkpoint (durability write_through): Ray restarts it over its LMDB, pulls and pushes in flight are
    re-sent, and the run completes; the artifact's row snapshot reproduces the test AUC and predictions."""
    import os
    import signal
    import threading
    import time

    import ray

    from recmix.jobs.train import ps_group, run
    from recmix.jobs.train.score import score
    from recmix.models.artifact import load_artifact

    out = tmp_path / "run"
    s = spec(tiny_dataset, out, durability="write_through").model_dump(mode="json", exclude_unset=True)
    s.update(epochs=2, scaling={"workers": 2}, checkpoint={"every_steps": 20})
    train_spec = JOB_ADAPTER.validate_python(s)
    killed: list[int] = []
    back: list[bool] = []

    def killer():
        snap = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while time.time() < deadline and not (snap.exists() and "checkpoint-" in snap.read_text()):
            time.sleep(0.2)
        ns = ps_group.namespace(train_spec)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]
        if names:
            shard = ray.get_actor(sorted(names)[0], namespace=ns)
            pid = ray.get(shard.pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            try:   # the restarted shard answers (unless the run ended and the driver destroyed the group first)
                back.append(ray.get(shard.info.remote(), timeout=60)["reconstructed"])
            except Exception:
                pass

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run(train_spec, log=lambda line: None)
    t.join(5)
    assert killed, "no shard was killed (the run ended before its first checkpoint?)"
    assert back in ([], [True]), back
    assert summary["world_size"] == 2 and summary["test"]["auc"] > 0.6, summary["test"]
    model = load_artifact(str(out / "artifact"))
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())   # rows come from the snapshot
    res = score(str(out / "artifact"), str(tiny_dataset), echo=lambda line: None)
    assert abs(res["auc"] - summary["test"]["auc"]) < 1e-6, (res, summary["test"])
    assert_same_predictions(str(out / "artifact"), str(tiny_dataset), out)
    # every checkpoint carries the shards' snapshot tied to it; the driver destroyed the group at the end
    cks = sorted((out / "checkpoints" / "train").glob("checkpoint-*"))
    assert cks and all((c / "ps" / "snapshot.json").exists() for c in cks)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "trainps" in str(a)]


@pytest.mark.slow
def test_two_ray_train_workers_on_a_global_batch_make_the_sparse_update_of_one(ray_cluster, tiny_dataset, tmp_path):  # noqa: F811
    """Per epoch one step on the whole train split (so Ray Data's unseeded shuffle changes nothing), 2 epochs,
    SGD rows: the rows 2 Ray Train workers leave in the shards (each pushing its half's gradient x 1/2) equal
    the rows of the same loop run by 1 worker, to 1e-5. The dense lr is tiny: AdamW's first step is about
    lr x sign(g), so float noise on a near-zero dense gradient would move a weight by a whole lr."""
    import pyarrow.fs as pafs

    from recmix.actors.rows import init_values
    from recmix.jobs.train import run, train
    from recmix.models.artifact import _snapshot_rows
    from recmix.platform.dataset import open_dataset

    n = open_dataset(str(tiny_dataset)).rows("train")
    assert n % 2 == 0     # equal halves: DDP's average of 2 half-batch means is the global mean
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        s = spec(tiny_dataset, out, optimizer={"kind": "sgd", "lr": 10.0}).model_dump(mode="json", exclude_unset=True)
        s.update(epochs=2, batch_size=n, optimizer=dict(name="adamw", lr=1e-7), early_stopping=dict(patience=5))
        if workers == 1:   # the same loop in this process (one rank, no Ray Train)
            res = train(JOB_ADAPTER.validate_python(s), log=lambda line: None)
            assert res.steps == 2
            runs[1] = (res.best_epoch, _snapshot_rows(pafs.LocalFileSystem(), str(out / "embeddings"))[1])
        else:
            s.update(scaling={"workers": 2})   # sparse.mode pass (the default): one pass per step here
            summary = run(JOB_ADAPTER.validate_python(s), log=lambda line: None)
            assert summary["world_size"] == 2 and summary["steps"] == 2
            runs[2] = (summary["best_epoch"], _snapshot_rows(pafs.LocalFileSystem(), summary["embeddings"])[1])
    assert runs[1][0] == runs[2][0]
    one, two = runs[1][1], runs[2][1]
    assert set(one) == set(two)
    for table in one:
        (ids1, v1), (ids2, v2) = one[table], two[table]
        o1, o2 = np.argsort(ids1), np.argsort(ids2)
        assert np.array_equal(ids1[o1], ids2[o2]), table
        assert np.abs(v1[o1] - v2[o2]).max() <= 1e-5, (table, np.abs(v1[o1] - v2[o2]).max())
    # and the update was not nothing: the trained item rows left their deterministic initial values
    cfg = JOB_ADAPTER.validate_python(spec(tiny_dataset, tmp_path)).embedding
    ids, v = one["item_id"]
    assert np.abs(v - init_values(cfg.initializer, cfg.seed, "item_id", ids, v.shape[1])).max() > 1e-3
