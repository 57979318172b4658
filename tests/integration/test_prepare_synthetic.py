"""Synthetic source: 1M rows through Ray tasks, determinism, Zipf ids, planted interaction, S3 output."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recmix.jobs.prepare import run, synthetic
from recmix.platform.dataset import open_dataset
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.data import StorageConfig
from recmix.platform.specs.prepare import PrepareSpec, SyntheticSource

SRC = {"type": "synthetic", "n_rows": 1_000_000, "n_users": 20_000, "n_items": 5_000, "chunk_rows": 250_000,
       "history_len": 20, "seed": 7, "zipf_exponent": 1.0, "noise": 0.5}


@pytest.fixture(scope="module")
def generated(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "ds"
    spec = PrepareSpec.model_validate({"kind": "prepare", "source": SRC, "output": {"uri": str(out)}})
    summary = run(spec, ClusterConfig())
    return summary, open_dataset(str(out))


def test_layout_and_splits(generated):
    summary, ds = generated
    assert summary["rows"] == 1_000_000
    assert [ds.rows(s) for s in ("train", "valid", "test")] == [800_000, 100_000, 100_000]
    # One file per chunk and split it overlaps: chunks 0-3 cover train [0, 800k) and valid/test share chunk 3.
    names = {s: [p.rsplit("/", 1)[1] for p in ds.manifest["splits"][s]["files"]] for s in ("train", "valid", "test")}
    assert names == {"train": [f"part-0000{i}.parquet" for i in range(4)], "valid": ["part-00003.parquet"], "test": ["part-00003.parquet"]}
    m = ds.manifest["splits"]
    assert m["train"]["ts_max"] < m["valid"]["ts_min"] <= m["valid"]["ts_max"] < m["test"]["ts_min"]
    s = ds.schema
    assert s.feature("user_id").vocab_size == 20_001 and s.feature("item_id").vocab_size == 5_001
    assert s.feature("hist_items").max_len == 20
    test = ds.read_split("test")
    assert pc.max(pc.list_value_length(test["hist_items"])).as_py() <= 20
    assert pc.min(test["user_id"]).as_py() >= 1 and pc.max(test["item_id"]).as_py() <= 5_000


def test_same_seed_same_first_chunk(generated):
    _, ds = generated
    src = SyntheticSource.model_validate(SRC)
    first = pq.read_table(ds.split_files("train")[0], filesystem=ds.filesystem)
    tables = synthetic.build_tables(src)
    again = synthetic.generate_chunk(src, tables, 0, 0, 250_000)
    assert again.select(first.column_names).cast(first.schema).equals(first)
    other = synthetic.generate_chunk(src.model_copy(update={"seed": 8}), synthetic.build_tables(src.model_copy(update={"seed": 8})), 0, 0, 250_000)
    assert not np.array_equal(other["item_id"].to_numpy(), first["item_id"].to_numpy())


def test_zipf_ids_and_planted_interaction(generated):
    _, ds = generated
    t = ds.read_split("train", columns=["user_id", "item_id", "label", "hist_items", "hist_ratings"])
    src = SyntheticSource.model_validate(SRC)
    tables = synthetic.build_tables(src)
    items = t["item_id"].to_numpy()
    counts = np.sort(np.bincount(items, minlength=5_001)[1:])[::-1]
    # Zipf(1.0): the most popular item is about twice as frequent as the second, ten times the tenth.
    assert 1.7 < counts[0] / counts[1] < 2.3 and 7 < counts[0] / counts[9] < 13
    users, y = t["user_id"].to_numpy(), t["label"].to_numpy()
    # Model-free: label rate by the sign of the planted interaction, and by latent quadrant of dim 0.
    inter = np.einsum("ij,ij->i", tables.U[users], tables.V[items])
    assert y[inter > 0].mean() - y[inter < 0].mean() > 0.3
    same = (tables.U[users, 0] > 0) == (tables.V[items, 0] > 0)
    assert y[same].mean() - y[~same].mean() > 0.05
    # The biases alone (what a linear model can see) explain much less than the full planted score.
    bias = tables.bu[users] + tables.bi[items]
    full = synthetic.score(tables, users, items)
    acc_bias, acc_full = np.mean((bias > 0) == (y > 0.5)), np.mean((full > 0) == (y > 0.5))
    assert acc_full > acc_bias + 0.1
    # History ratings come from the same planted score: high ratings go with a positive interaction.
    flat_items = pc.list_flatten(t["hist_items"]).to_numpy()[:200_000]
    parent = pc.list_parent_indices(t["hist_items"]).to_numpy()[:200_000]
    ratings = pc.list_flatten(t["hist_ratings"]).to_numpy()[:200_000]
    s = synthetic.score(tables, users[parent], flat_items)
    assert s[ratings >= 4].mean() > 0.5 > -0.5 > s[ratings <= 2].mean()


def test_synthetic_to_s3(ray_cluster, s3_server, s3_bucket):
    bucket = s3_bucket
    s3_bucket = bucket
    uri = f"s3://{s3_bucket}/syn"
    spec = PrepareSpec.model_validate({"kind": "prepare", "output": {"uri": uri}, "storage": {"endpoint_url": s3_server},
                                       "source": {**SRC, "n_rows": 30_000, "chunk_rows": 10_000}})
    run(spec, ClusterConfig())
    ds = open_dataset(uri, StorageConfig(endpoint_url=s3_server))
    assert ds.read_split("train").num_rows == 24_000 and ds.read_split("test").num_rows == 3_000
    assert all(p.startswith(f"{s3_bucket}/syn/{ds.version}/") for p in ds.split_files("valid"))
    # The documented Ray Data path: split files on the dataset's own filesystem.
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    rd = ray.data.read_parquet(ds.split_files("valid"), filesystem=ds.filesystem)
    assert rd.count() == 3_000 and "hist_items" in rd.schema().names
