"""Platform layer: the routing hash contract, the Ray helper, and the bench output convention."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recmix.platform import bench, hashing


def test_mix64_matches_reference_splitmix64():
    # Reference: the splitmix64 finalizer written out with Python integers.
    def ref(x: int) -> int:
        m = (1 << 64) - 1
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & m
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    xs = [0, 1, 2, 12345, (1 << 63) + 7, (1 << 64) - 1]
    got = hashing.mix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [ref(x) for x in xs]


def test_mix64_does_not_modify_input_and_accepts_int64():
    ids = np.array([-1, 5, 7], dtype=np.int64)
    before = ids.copy()
    out = hashing.mix64(ids)
    assert np.array_equal(ids, before)
    assert out.dtype == np.uint64 and out[0] == hashing.mix64(np.array([(1 << 64) - 1], dtype=np.uint64))[0]


def test_shard_routing_is_deterministic_balanced_and_table_dependent():
    ids = np.arange(200_000, dtype=np.int64)
    s4 = hashing.shard_of("item", ids, 4)
    assert np.array_equal(s4, hashing.shard_of("item", ids, 4))
    counts = np.bincount(s4, minlength=4)
    assert counts.min() > 0.97 * len(ids) / 4
    # Another table sends the same ids elsewhere (tables are independent key spaces).
    assert (hashing.shard_of("user", ids, 4) != s4).mean() > 0.7
    with pytest.raises(ValueError, match="n_shards must be positive"):
        hashing.shard_of("item", ids, 0)


def test_bucket_and_string_id_ranges():
    b = hashing.bucket(np.arange(10_000), 97)
    assert b.min() >= 0 and b.max() < 97 and len(np.unique(b)) == 97
    sid = hashing.string_id(["T8H", "021", "T8H"])
    assert sid[0] == sid[2] and sid[0] != sid[1] and (sid >= 0).all()


def test_bench_prints_table_then_json_last_line(capsys, tmp_path):
    bench.register("_unit", "tests.bench_fixture:run")
    try:
        out = tmp_path / "b.txt"
        payload = bench.run_bench("_unit", quick=True, out=str(out))
    finally:
        bench._REGISTRY.pop("_unit")
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last == json.loads(json.dumps(payload))
    assert last["results"]["ratio"] == pytest.approx(0.5) and last["quick"] is True
    assert {"cores", "torch", "ray", "device"} <= set(last["machine"])
    assert "fixture bench" in lines[0]
    assert out.read_text().strip().splitlines()[-1] == lines[-1]


def test_unknown_bench_is_a_user_error():
    from recmix.platform.errors import RecmixError

    with pytest.raises(RecmixError, match="unknown benchmark 'nope'"):
        bench.resolve("nope")


def test_local_cluster_binds_dashboard_to_loopback(ray_cluster):
    import ray

    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 4
    # The session cluster runs without a dashboard; the helper's default address is loopback.
    from recmix.platform.specs.cluster import ClusterConfig

    assert ClusterConfig().dashboard_host == "127.0.0.1"
