"""Parameter-server checkpoint manifests are untrusted input (issue 14, item 7): no read outside the folder."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from recmix.actors import checkpoint
from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.hashing import HASH_ID

DIMS, SWIDTH = {"item": 4}, {"item": 1}


def _npz(path, n=3):
    buf = io.BytesIO()
    np.savez(buf, ids=np.arange(n, dtype=np.int64), rows=np.zeros(n, dtype=np.float32))
    path.write_bytes(buf.getvalue())


def _checkpoint(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": checkpoint.FORMAT, "hash": HASH_ID, "shards": 1, "pass": 0,
                "tables": {"item": {"dim": 4, "state": 1}}, "rows": {"item": 3}, "files": files, "created": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def _restore_reads(uri):
    fs, base = storage.resolve(uri)
    m = checkpoint._manifest(fs, base, uri, DIMS, SWIDTH)
    return list(checkpoint._files(fs, base, m, DIMS))


@pytest.mark.parametrize("name", ["../victim/secret.npz", "/tmp/secret.npz", "rows-0-item.npz/../../victim/secret.npz",
                                  "sub/rows-0-item.npz", "rows-0-item.npz\x00.txt", "", None, 7])
def test_hostile_file_entry_refused(tmp_path, name):
    _npz((tmp_path / "victim").mkdir() or tmp_path / "victim" / "secret.npz")
    uri = _checkpoint(tmp_path / "ckpt", [{"file": name, "shard": 0, "table": "item", "rows": 3}])
    with pytest.raises(RecmixError, match="not a checkpoint file of this folder"):
        _restore_reads(uri)


def test_entry_must_match_its_shard_and_table(tmp_path):
    _npz((tmp_path / "ckpt").mkdir() or tmp_path / "ckpt" / "rows-1-item.npz")
    uri = _checkpoint(tmp_path / "ckpt", [{"file": "rows-1-item.npz", "shard": 0, "table": "item", "rows": 3}])
    with pytest.raises(RecmixError, match="does not match its shard"):
        _restore_reads(uri)


def test_symlink_out_of_the_folder_refused(tmp_path):
    _npz((tmp_path / "victim").mkdir() or tmp_path / "victim" / "secret.npz")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "rows-0-item.npz").symlink_to(tmp_path / "victim" / "secret.npz")
    uri = _checkpoint(tmp_path / "ckpt", [{"file": "rows-0-item.npz", "shard": 0, "table": "item", "rows": 3}])
    with pytest.raises(RecmixError, match="resolves outside the checkpoint folder"):
        _restore_reads(uri)


@pytest.mark.parametrize("manifest", [[], "x", {"format": "recmix-ps-v1", "hash": HASH_ID, "tables": {}, "files": "rows-0-item.npz"}])
def test_malformed_manifest_is_one_line(tmp_path, manifest):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError):
        _restore_reads(str(tmp_path))


def test_honest_checkpoint_still_reads(tmp_path):
    _npz((tmp_path / "ckpt").mkdir() or tmp_path / "ckpt" / "rows-0-item.npz")
    uri = _checkpoint(tmp_path / "ckpt", [{"file": "rows-0-item.npz", "shard": 0, "table": "item", "rows": 3}])
    [(table, ids, _)] = _restore_reads(uri)
    assert table == "item" and ids.tolist() == [0, 1, 2]
