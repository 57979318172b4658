"""LMN memory shards as real Ray actors on the session cluster: a killed shard restarts with its values,
a checkpoint restores onto another shard count, workers attach by name, destroy removes the files."""

from __future__ import annotations

import glob
import time
import uuid

import numpy as np
import ray
import torch

from recmix.actors import checkpoint
from recmix.actors.group import attach, attach_lookup, create_memory_group
from recmix.actors.memory import MemoryShardConfig
from recmix.models.embedding import TableSpec

T = "lmn_values"
N, E = 2000, 8
TABLES = {T: TableSpec(T, N, E, False)}


def _kill_and_wait(shard) -> None:
    old = ray.get(shard.pid.remote())
    ray.kill(shard, no_restart=False)
    deadline = time.time() + 60
    while True:
        try:
            if ray.get(shard.pid.remote(), timeout=10) != old:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.time() < deadline, "memory shard did not come back"
        time.sleep(0.05)


def test_memory_group_restart_reshard_attach_and_cleanup(ray_cluster, tmp_path):
    ns = f"lmn-test-{uuid.uuid4().hex[:8]}"
    cfg = MemoryShardConfig(name="mem_a", shards=2, optimizer={"kind": "sgd", "lr": 1.0})
    group = create_memory_group(cfg, TABLES, namespace=ns)
    other = None
    try:
        client = attach("mem_a", ns)                       # a worker's view: layout and optimizer from the shards
        assert client.layout.ranges == {T: N}
        all_ids = np.arange(N, dtype=np.int64)
        ids = np.array([3, 999, 1000, 1999, 3], np.int64)
        client.push({T: (ids, np.ones((ids.size, E), np.float32))})
        want = client.pull({T: all_ids})[T].copy()

        _kill_and_wait(group.handles[1])
        info = ray.get(group.handles[1].info.remote())
        assert info["reconstructed"] and info["reopened"]
        np.testing.assert_array_equal(client.pull({T: all_ids})[T], want)   # restarted with its values
        client.push({T: (np.array([1500], np.int64), np.ones((1, E), np.float32))})
        np.testing.assert_allclose(client.pull({T: np.array([1500], np.int64)})[T][0], want[1500] - 1.0)
        want = client.pull({T: all_ids})[T].copy()

        lk = attach_lookup(group.ref, TABLES, mode="batch")   # the model's lookup over the group
        lk.lookup(T, torch.tensor([[7, 8]])).sum().backward()
        lk.close()                                           # waits for the push; the shards keep running
        want[[7, 8]] -= 1.0
        np.testing.assert_allclose(client.pull({T: all_ids})[T], want, atol=1e-6)

        uri = str(tmp_path / "ckpt")
        m = checkpoint.save(client, uri)
        assert m["rows"] == {T: N}
        other = create_memory_group(MemoryShardConfig(name="mem_b", shards=3, optimizer=cfg.optimizer), TABLES, namespace=ns)
        c3 = other.client()
        checkpoint.restore(c3, uri)
        np.testing.assert_array_equal(c3.pull({T: all_ids})[T], want)
        assert [c[T]["ram"] for c in c3.counts()] == [666, 667, 667]
        c3.close()
        client.close()
    finally:
        roots = [g.root for g in (group, other) if g is not None]
        group.destroy()
        if other is not None:
            other.destroy()
    assert not [p for r in roots for p in glob.glob(f"{r}-*")], "destroy left memory files behind"
