"""MovieLens-100K prepare on the evaluation contract: sizes, split order, label rates, leak-free history."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest

from recmix.jobs.prepare import run
from recmix.platform.dataset import open_dataset
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.prepare import PrepareSpec

CONTRACT = {"train": (80_000, 0.5509), "valid": (10_000, 0.5674), "test": (10_000, 0.5629)}


def spec(path, out, **extra) -> PrepareSpec:
    return PrepareSpec.model_validate({"kind": "prepare", "source": {"type": "movielens100k", "path": str(path), **extra.pop("source", {})},
                                       "output": {"uri": str(out)}, **extra})


@pytest.fixture(scope="module")
def raw(ml100k_dir):
    return np.loadtxt(ml100k_dir / "u.data", dtype=np.int64)  # user, item, rating, ts


@pytest.fixture(scope="module")
def prepared(ml100k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "ds"
    summary = run(spec(ml100k_dir, out), ClusterConfig())
    ds = open_dataset(str(out))
    tables = {s: ds.read_split(s) for s in ("train", "valid", "test")}
    return summary, ds, tables


def test_sizes_label_rates_and_time_order(prepared, raw):
    summary, ds, tables = prepared
    assert summary["rows"] == 100_000
    direct = float(np.mean(raw[:, 2] >= 4))
    all_labels = np.concatenate([t.column("label").to_numpy() for t in tables.values()])
    assert abs(all_labels.mean() - direct) < 0.01 * direct
    for split, (rows, rate) in CONTRACT.items():
        t = tables[split]
        assert t.num_rows == rows == ds.manifest["splits"][split]["rows"]
        assert abs(pc.mean(t.column("label")).as_py() - rate) < 5e-5
        assert abs(ds.manifest["splits"][split]["label_rate"] - rate) < 5e-5
    # Boundaries are time-ordered, and within the concatenation rows follow (timestamp, user, item).
    assert pc.max(tables["train"]["timestamp"]).as_py() <= pc.min(tables["valid"]["timestamp"]).as_py()
    assert pc.max(tables["valid"]["timestamp"]).as_py() <= pc.min(tables["test"]["timestamp"]).as_py()
    key = np.concatenate([np.stack([t["timestamp"].to_numpy(), t["user_id"].to_numpy(), t["item_id"].to_numpy()], 1)
                          for t in tables.values()])
    assert np.array_equal(np.lexsort(key.T[::-1]), np.arange(len(key)))
    # The contract's tie-break example: one second with 1 train row and 3 valid rows of the same user.
    b = pc.max(tables["train"]["timestamp"]).as_py()
    assert ds.manifest["splits"]["train"]["ts_max"] == b == ds.manifest["splits"]["valid"]["ts_min"]
    assert sum(pc.sum(pc.equal(t["timestamp"], b)).as_py() for t in tables.values()) == 4
    assert np.array_equal(np.sort(raw[:, 3]), key[:, 0])


def test_history_is_strictly_earlier_and_complete(prepared, raw):
    _, _, tables = prepared
    ts_of = np.full((944, 1683), -1, np.int64)
    rating_of = np.zeros((944, 1683), np.int64)
    ts_of[raw[:, 0], raw[:, 1]] = raw[:, 3]
    rating_of[raw[:, 0], raw[:, 1]] = raw[:, 2]
    n_checked = 0
    for t in tables.values():
        hist = t.column("hist_items").combine_chunks()
        parent = pc.list_parent_indices(hist).to_numpy()
        items = pc.list_flatten(hist).to_numpy()
        users = t["user_id"].to_numpy()[parent]
        h_ts = ts_of[users, items]
        assert (h_ts >= 0).all(), "history item the user never rated"
        assert (h_ts < t["timestamp"].to_numpy()[parent]).all(), "history item at or after its row's timestamp"
        # Most recent last: history timestamps never decrease within a row.
        same_row = parent[1:] == parent[:-1]
        assert (np.diff(h_ts)[same_row] >= 0).all()
        assert np.array_equal(pc.list_flatten(t["hist_ratings"]).to_numpy(), rating_of[users, items])
        assert np.array_equal(pc.list_value_length(hist).to_numpy(), pc.list_value_length(t["hist_ratings"]).to_numpy())
        # time-gap buckets, aligned: floor(log2(row ts - history ts)), clipped to the vocabulary
        gaps = pc.list_flatten(t["hist_gaps"]).to_numpy()
        want = np.minimum(np.floor(np.log2(t["timestamp"].to_numpy()[parent] - h_ts)), 25)
        assert np.array_equal(gaps, want) and np.array_equal(pc.list_parent_indices(t["hist_gaps"]).to_numpy(), parent)
        n_checked += len(items)
    assert n_checked > 1_000_000
    # Completeness on a sample, computed directly from u.data: the last <= 50 strictly earlier ratings.
    t = tables["test"]
    rng = np.random.default_rng(0)
    for i in rng.choice(t.num_rows, 200, replace=False):
        row = t.slice(int(i), 1).to_pylist()[0]
        mine = raw[(raw[:, 0] == row["user_id"]) & (raw[:, 3] < row["timestamp"])]
        mine = mine[np.lexsort((mine[:, 1], mine[:, 3]))][-50:]
        assert row["hist_items"] == mine[:, 1].tolist()


def test_item_user_and_context_features(prepared, ml100k_dir):
    _, ds, tables = prepared
    items = {int(l.split("|")[0]): l.split("|") for l in (ml100k_dir / "u.item").read_text(encoding="latin-1").splitlines()}
    users = {int(l.split("|")[0]): l.split("|") for l in (ml100k_dir / "u.user").read_text().splitlines()}
    occupations = (ml100k_dir / "u.occupation").read_text().split()
    for row in tables["valid"].slice(0, 300).to_pylist():
        it = items[row["item_id"]]
        assert row["genres"] == [g for g, flag in enumerate(it[5:]) if flag == "1"]
        year = it[2][-4:]
        assert row["year_bucket"] == (int(year) // 5 - 1900 // 5 + 1 if year else 0)
        u = users[row["user_id"]]
        assert (row["age_bucket"], row["gender"], row["occupation"]) == (int(u[1]) // 10, int(u[2] == "M"), occupations.index(u[3]))
        when = dt.datetime.fromtimestamp(row["timestamp"], dt.timezone.utc)
        assert (row["hour"], row["weekday"]) == (when.hour, when.weekday())
        assert row["user_key"] == row["user_id"]
    zips = {z for t in tables.values() for z in t["zip_prefix"].to_numpy()}
    assert len(zips) == len({u[4][:3] for u in users.values()}) and min(zips) >= 0
    # Schema: the built-in one, stored in the manifest and read back as a FeatureSchema.
    s = ds.schema
    assert [g.name for g in s.groups] == ["user", "history", "item", "context"]
    assert s.feature("hist_items").table_name == "item_id" and s.feature("hist_items").max_len == 50
    assert s.feature("user_id").vocab_size == 944 and s.feature("item_id").vocab_size == 1683
    assert s.feature("zip_prefix").hash_buckets and s.feature("genres").vocab_size == 19
    assert {f.embedding_dim for f in s.inputs} == {16}
    tok = s.feature("hist_items").tokens
    assert tok.attributes == ["hist_ratings", "hist_gaps"] and tok.target == "item_id"
    assert s.feature("hist_gaps").vocab_size == 26 and s.feature("user_id").train_dropout > 0
    m = ds.manifest
    assert m["format"] == "recmix-dataset-v1" and m["timestamp_column"] == "timestamp"
    assert m["source"]["type"] == "movielens100k" and m["created_utc"].endswith("Z")
    assert all(not p.startswith("/") and p.startswith(m["version"] + "/") for sp in m["splits"].values() for p in sp["files"])


def test_rerun_replaces_version_atomically(ml100k_dir, tmp_path):
    out = tmp_path / "ds"
    first = run(spec(ml100k_dir, out, source={"history_len": 5}), ClusterConfig())
    second = run(spec(ml100k_dir, out, source={"history_len": 5}), ClusterConfig())
    assert first["version"] != second["version"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["_manifest.json", second["version"]])
    ds = open_dataset(str(out))
    assert ds.version == second["version"] and ds.schema.feature("hist_items").max_len == 5
    assert pc.max(pc.list_value_length(ds.read_split("train")["hist_items"])).as_py() == 5


def test_declared_schema_is_validated_and_used(ml100k_dir, tmp_path, prepared):
    features = prepared[1].manifest["features"]
    for f in features["features"]:
        if f["name"] == "user_id":
            f["embedding_dim"] = 8
    features["features"] = [f for f in features["features"] if f["name"] not in ("zip_prefix",)]
    run(spec(ml100k_dir, tmp_path / "a", features=features), ClusterConfig())
    ds = open_dataset(str(tmp_path / "a"))
    assert ds.schema.feature("user_id").embedding_dim == 8
    assert "zip_prefix" not in ds.read_split("test").column_names

    bad = json.loads(json.dumps(features))
    for f in bad["features"]:
        if f["name"] == "user_id":
            f["vocab_size"] = 100
        if f["name"] == "hist_items":
            f["max_len"], f["vocab_size"], f["table"] = 10, 1683, None
            f.pop("tokens")   # its attributes keep max_len 50, and the target shares no table now
    bad["features"].append({"name": "rating_dense", "role": "user", "type": "dense", "group": "user"})
    with pytest.raises(RecmixError) as e:
        run(spec(ml100k_dir, tmp_path / "b", features=bad), ClusterConfig())
    msg = str(e.value)
    assert "3 column problems" in msg or "column problem" in msg
    assert "rating_dense" in msg and "missing" in msg
    with pytest.raises(RecmixError) as e:
        bad["features"].pop()
        run(spec(ml100k_dir, tmp_path / "b", features=bad), ClusterConfig())
    assert "'user_id' has id 943 >= vocab_size 100" in str(e.value)
    assert "'hist_items' has a list of length 50 > max_len 10" in str(e.value)


def test_checksum_policies(ml100k_dir, tmp_path):
    copy = tmp_path / "ml"
    shutil.copytree(ml100k_dir, copy)
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(RecmixError, match="checksums: required but .*SHA256SUMS does not exist"):
        run(spec(copy, tmp_path / "o", source={"checksums": "required"}), ClusterConfig())
    data = bytearray((copy / "u.data").read_bytes())
    data[100] ^= 0x01
    (copy / "u.data").write_bytes(bytes(data))
    shutil.copy(ml100k_dir / "SHA256SUMS", copy / "SHA256SUMS")
    with pytest.raises(RecmixError, match=r"checksum mismatch for .*u\.data"):
        run(spec(copy, tmp_path / "o"), ClusterConfig())
    assert not (tmp_path / "o" / "_manifest.json").exists()


def test_open_dataset_errors(tmp_path):
    with pytest.raises(RecmixError, match="not a prepared dataset"):
        open_dataset(str(tmp_path))
    (tmp_path / "_manifest.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(RecmixError, match="expected 'recmix-dataset-v1'"):
        open_dataset(str(tmp_path))
    with pytest.raises(RecmixError, match="unsupported URI scheme 'gs://'"):
        open_dataset("gs://bucket/x")


def test_missing_files_name_RECMIX_ML100K(tmp_path):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t1\t5\t881250949\n")
    with pytest.raises(RecmixError, match=r"no MovieLens-100K at .*ml \(missing u.user, u.item, u.genre, u.occupation\); "
                                          r"set RECMIX_ML100K"):
        run(spec(tmp_path / "ml", tmp_path / "o"), ClusterConfig())
