"""The read-only serving shard group: a parameter-server artifact's embedding snapshot in ServingShard actors,
read by the replica's model through a hot cache. Scores equal load_artifact's (the snapshot loaded into the
process); the cache answers repeated ids without a shard call; nothing is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from recmix.models.artifact import load_artifact, resolve_version
from tests.serve_fixture import offline_scores, request_rows, write_ps_artifact

pytestmark = pytest.mark.slow


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_shard_group_scores_equal_the_loaded_snapshot_and_never_writes(ray_cluster, tmp_path):
    import ray

    from recmix.jobs.serve.shards import ServingShard, load_with_shard_group

    root = write_ps_artifact(str(tmp_path / "art"))
    uri = resolve_version(root)
    before = _digest(Path(uri) / "embeddings")
    ref = load_artifact(root)
    model = load_with_shard_group(uri, None, shards=3, hot_rows=64, cpus=0)
    lookup = model.encoder.lookup
    bodies = [request_rows(20, seed=s, user=s) for s in range(3)]
    for b in bodies:
        assert max(abs(x - y) for x, y in zip(offline_scores(model, b), offline_scores(ref, b))) < 1e-6
    misses, calls = lookup.misses, sum(ray.get([s.stats.remote() for s in lookup.shards])[i]["calls"]
                                       for i in range(3))
    assert misses > 0 and calls > 0
    offline_scores(model, bodies[0])                  # the same ids again: answered by the hot cache
    stats = ray.get([s.stats.remote() for s in lookup.shards])
    assert lookup.misses == misses and lookup.hits > 0 and sum(s["calls"] for s in stats) == calls
    # every snapshot row sits in exactly one shard; the files are untouched; the actor API only reads
    total = {t: sum(s["rows"].get(t, 0) for s in stats) for t in stats[0]["rows"]}
    for t, n in total.items():
        with np.load(Path(uri) / "embeddings" / f"{t}.npz") as z:
            assert n == z["ids"].size
    assert _digest(Path(uri) / "embeddings") == before
    methods = {m for m in dir(ServingShard) if not m.startswith("_") and callable(getattr(ServingShard, m))}
    assert methods - {"options", "remote", "bind"} == {"get", "stats"}
    for s in lookup.shards:
        ray.kill(s)
