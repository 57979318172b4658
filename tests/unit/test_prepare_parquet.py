"""`source.type: parquet`: declared schema checked against the parquet schema and values, then split by time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recmix.jobs.prepare import run
from recmix.platform.dataset import open_dataset
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.prepare import PrepareSpec

N = 5000
FEATURES = {
    "groups": [{"name": "u", "side": "user"}, {"name": "c", "side": "candidate"}],
    "features": [
        {"name": "uid", "role": "user", "type": "categorical", "vocab_size": 100, "embedding_dim": 8, "group": "u"},
        {"name": "recent", "role": "sequence", "type": "sequence", "vocab_size": 50, "embedding_dim": 8, "table": "item",
         "max_len": 5, "group": "u"},
        {"name": "item", "role": "item", "type": "categorical", "vocab_size": 50, "embedding_dim": 8, "group": "c"},
        {"name": "tags", "role": "item", "type": "multi_categorical", "hash_buckets": 64, "embedding_dim": 8, "max_len": 3, "group": "c"},
        {"name": "price", "role": "item", "type": "dense", "group": "c"},
        {"name": "clicked", "role": "label", "type": "dense"},
    ],
}


def write_source(folder, n=N, seed=0, **override):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, n)
    cols = {
        "uid": pa.array(rng.integers(0, 100, n).astype(np.int32)),
        "recent": pa.array([list(rng.integers(1, 50, k)) for k in lengths], pa.list_(pa.int16())),
        "item": pa.array(rng.integers(0, 50, n)),
        "tags": pa.array([list(rng.integers(0, 10**12, k % 4)) for k in lengths], pa.list_(pa.int64())),
        "price": pa.array(rng.random(n)),
        "clicked": pa.array(rng.random(n) < 0.3),
        "event_time": pa.array((1_600_000_000 + rng.integers(0, 10**6, n)) * 1000, pa.timestamp("ms")),
        "extra": pa.array(["x"] * n),
    }
    cols.update(override)
    table = pa.table(cols)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, n // 2), folder / "a.parquet")
    pq.write_table(table.slice(n // 2), folder / "b.parquet")
    return table


def spec(src, out, features=FEATURES, **source):
    return PrepareSpec.model_validate({
        "kind": "prepare", "features": features, "output": {"uri": str(out)},
        "source": {"type": "parquet", "uri": str(src), "timestamp_column": "event_time", "user_key_column": "uid",
                   "rows_per_file": 1500, **source}})


def test_parquet_source_split_by_time(tmp_path):
    source = write_source(tmp_path / "src")
    summary = run(spec(tmp_path / "src", tmp_path / "out"), ClusterConfig())
    ds = open_dataset(str(tmp_path / "out"))
    assert summary["rows"] == N
    parts = {s: ds.read_split(s) for s in ("train", "valid", "test")}
    assert [t.num_rows for t in parts.values()] == [4000, 500, 500]
    # at least MIN_FILES (4) files per split, none above rows_per_file (1500)
    files = ds.split_files("train")
    assert len(files) == 4 and max(pq.read_metadata(f).num_rows for f in files) <= 1500
    assert len(ds.split_files("valid")) == 4
    t = pa.concat_tables(parts.values())
    ts = t["timestamp"].to_numpy()
    assert (np.diff(ts) >= 0).all() and ts.min() >= 1_600_000_000 and ts.max() < 1_601_000_000
    assert t.schema.field("recent").type == pa.list_(pa.int64()) and t.schema.field("uid").type == pa.int64()
    assert t.schema.field("price").type == pa.float32() and t.schema.field("clicked").type == pa.float32()
    assert "extra" not in t.column_names and t["user_key"].equals(t["uid"])
    # Same multiset of rows as the source (sorting only reorders).
    src_ts = source["event_time"].cast(pa.int64()).to_numpy() // 1000
    assert np.array_equal(np.sort(src_ts), ts)
    assert t["clicked"].to_numpy().sum() == source["clicked"].to_numpy().sum()
    assert ds.manifest["source"]["type"] == "parquet" and ds.schema.feature("tags").hash_buckets == 64


def test_parquet_schema_mismatches_reported_together(tmp_path):
    write_source(tmp_path / "src", uid=pa.array(["a"] * N), item=pa.array([[1]] * N), recent=pa.array(np.ones(N, np.int64)))
    features = {**FEATURES, "features": FEATURES["features"] + [
        {"name": "missing_col", "role": "item", "type": "categorical", "vocab_size": 3, "embedding_dim": 4, "group": "c"}]}
    with pytest.raises(RecmixError) as e:
        run(spec(tmp_path / "src", tmp_path / "out", features=features, user_key_column="nope"), ClusterConfig())
    msg = str(e.value)
    assert "5 column problems" in msg
    assert "column 'uid' is string (a scalar) but categorical feature needs an integer scalar" in msg
    assert "column 'item' is list<int64> (a list) but categorical feature needs an integer scalar" in msg
    assert "column 'recent' is int64 (a scalar) but sequence feature needs a list of integers" in msg
    assert "column 'missing_col' (categorical) is missing" in msg
    assert "user_key_column column 'nope' is missing" in msg
    assert not (tmp_path / "out").exists()


def test_parquet_value_problems(tmp_path):
    rng = np.random.default_rng(1)
    write_source(tmp_path / "src", item=pa.array(rng.integers(0, 60, N)),
                 recent=pa.array([[1, 2, 3, 4, 5, 6]] * N, pa.list_(pa.int64())))
    with pytest.raises(RecmixError) as e:
        run(spec(tmp_path / "src", tmp_path / "out"), ClusterConfig())
    assert "column 'item' has id 59 >= vocab_size 50" in str(e.value)
    assert "column 'recent' has a list of length 6 > max_len 5" in str(e.value)
    with pytest.raises(RecmixError, match="parquet source .*nowhere: not found"):
        run(spec(tmp_path / "nowhere", tmp_path / "out"), ClusterConfig())
