"""Snapshots of a shard group tied to a dense checkpoint, restored exactly.

A snapshot is a parameter-server checkpoint (checkpoint.py) plus `snapshot.json` naming the dense
checkpoint it belongs to (`checkpoint_id`, e.g. the trainer's global step or the Ray Train checkpoint
folder name). `restore_snapshot` first empties every shard (rows of both tiers, admission counters)
and then loads the checkpoint, so the shards hold exactly the snapshot's rows: rows created after it
are gone, and the pass counter is the snapshot's. Call both from one process while no worker pushes
(e.g. rank 0 between two barriers); open working sets and prefetched passes are stale afterwards.
"""

from __future__ import annotations

import io
import json

import numpy as np

from recmix.actors import checkpoint
from recmix.actors.client import PSClient
from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig

MARKER = "snapshot.json"


def save_snapshot(client: PSClient, uri: str, checkpoint_id: str,
                  storage_cfg: StorageConfig | None = None) -> dict:
    """Checkpoint every shard to `uri` (a new local folder or s3:// prefix, e.g. inside the dense
    checkpoint's folder) and record `checkpoint_id`; returns the checkpoint manifest."""
    manifest = checkpoint.save(client, uri, storage_cfg)
    fs, base = storage.resolve(uri, storage_cfg)
    storage.write_bytes_atomic(fs, storage.join(base, MARKER),
                               json.dumps({"checkpoint_id": str(checkpoint_id)}).encode())
    return manifest


def snapshot_id(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """The dense checkpoint id a snapshot belongs to; `RecmixError` if `uri` holds no snapshot."""
    fs, base = storage.resolve(uri, storage_cfg)
    try:
        return str(storage.read_json(fs, storage.join(base, MARKER))["checkpoint_id"])
    except (FileNotFoundError, OSError, KeyError, ValueError) as e:
        raise RecmixError(f"no parameter-server snapshot at {uri} ({MARKER} unreadable: {e})") from None


def restore_snapshot(client: PSClient, uri: str, checkpoint_id: str | None = None,
                     storage_cfg: StorageConfig | None = None) -> dict:
    """Return the shards exactly to the snapshot at `uri` (any shard count). With `checkpoint_id`,
    a snapshot that belongs to another dense checkpoint is refused before anything changes."""
    got = snapshot_id(uri, storage_cfg)
    if checkpoint_id is not None and got != str(checkpoint_id):
        raise RecmixError(f"parameter-server snapshot at {uri} belongs to checkpoint '{got}', "
                          f"not '{checkpoint_id}'")
    fs, base = storage.resolve(uri, storage_cfg)
    m = checkpoint._manifest(fs, base, uri, client.dims, client.swidth)   # checked before clearing
    client.clear(int(m["pass"]))
    checkpoint.restore(client, uri, storage_cfg)
    if m["shards"] == client.n_shards:
        # restore() sums every old shard's admission counters into each new shard (right when re-sharding);
        # on the same shard count each shard takes back exactly its own.
        for f in m["files"]:
            if f.get("filter") and f["table"] in client.dims:
                counters = np.load(io.BytesIO(storage.read_bytes(fs, checkpoint._inside(fs, base, f["file"]))))
                client.backend.call(f["shard"], "set_admission", f["table"], counters)
    return m
