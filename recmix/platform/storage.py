"""Storage URIs: local paths, file:// and s3://, resolved to a pyarrow filesystem plus a path.

Credentials are never part of a spec: pyarrow and s3fs read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(and AWS_ENDPOINT_URL) from the environment. `StorageConfig.endpoint_url` points at S3-compatible servers.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Optional

import pyarrow.fs as pafs

from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str, storage: Optional[StorageConfig] = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI; local paths are made absolute."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kw = {"region": storage.region}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(**kw), uri[len("s3://"):].rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise RecmixError(f"not found: {path}") from None
    except OSError as e:
        raise RecmixError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Local: write a temp file and rename. S3: a single PUT is already all-or-nothing."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(fs: pafs.FileSystem, path: str) -> dict:
    return json.loads(read_bytes(fs, path))
