"""Storage URIs: local paths, file:// and s3://, resolved to a pyarrow filesystem plus a path.

Credentials are never part of a spec: pyarrow and s3fs read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(and AWS_ENDPOINT_URL) from the environment, or the rest of the AWS credential chain (profile files,
instance roles) of the machine they run on. `StorageConfig.endpoint_url` points at S3-compatible servers.
Every S3 operation is bounded in time (`StorageConfig`); errors become one RecmixError line (`describe`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
from typing import Optional

import pyarrow.fs as pafs

from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def endpoint(storage: Optional[StorageConfig] = None) -> str:
    """The S3 endpoint in use, for messages."""
    storage = storage or StorageConfig()
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or f"AWS S3 ({storage.region})"


def resolve(uri: str, storage: Optional[StorageConfig] = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI; local paths are made absolute. S3 operations are bounded in time
    (`StorageConfig.worst_case_s`)."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        url = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kw = {"region": storage.region, "connect_timeout": storage.connect_timeout_s,
              "request_timeout": storage.request_timeout_s,
              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts)}
        if url:
            scheme, _, host = url.partition("://")
            kw.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(**kw), uri[len("s3://"):].rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def describe(err: OSError, storage: Optional[StorageConfig] = None) -> str:
    """One line naming the cause of a filesystem error (S3 errors arrive as long OSError texts)."""
    text = " ".join(str(err).split())
    storage = storage or StorageConfig()
    where = endpoint(storage)
    if "curlCode: 28" in text or "Timeout was reached" in text:
        return (f"the S3 endpoint {where} did not answer (timed out; at most {storage.max_attempts} attempt(s) of "
                f"connect_timeout_s={storage.connect_timeout_s:g} + request_timeout_s={storage.request_timeout_s:g})")
    if "NETWORK_CONNECTION" in text:
        return f"cannot reach the S3 endpoint {where}: {text.rpartition('Details: ')[2] or text}"
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        if code in text or re.sub(r"(?<!^)([A-Z])", r"_\1", code).upper() in text:  # pyarrow: INVALID_ACCESS_KEY_ID
            return (f"the S3 endpoint {where} rejected the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY (or the node's credential chain)")
    if "ACCESS_DENIED" in text or "AccessDenied" in text:
        return f"access denied by the S3 endpoint {where}; check the credentials and the bucket policy"
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return f"no such bucket at the S3 endpoint {where}: {text}"
    return text


def check_writable(uri: str, storage: Optional[StorageConfig] = None) -> None:
    """Before any work: the output location exists or can be created, and takes a file (written, then deleted).

    Raises RecmixError with one line naming the location and the cause (not a folder, permission, S3 endpoint
    unreachable or silent, credentials rejected, no such bucket)."""
    import uuid

    fs, root = resolve(uri, storage)
    probe = join(root, f".recmix-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            if os.path.exists(root) and not os.path.isdir(root):
                raise RecmixError(f"output location {uri} is not a folder (a file is there)")
            # Folders made for the probe are removed again: a job that fails later leaves no trace.
            top = root
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            made = not os.path.exists(root)
            os.makedirs(root, exist_ok=True)
            try:
                with open(probe, "wb") as f:
                    f.write(b"")
                os.unlink(probe)
            finally:
                if made:
                    shutil.rmtree(top, ignore_errors=True)
        else:
            with fs.open_output_stream(probe) as f:
                f.write(b"")
            fs.delete_file(probe)
    except OSError as e:
        raise RecmixError(f"output location {uri} is not writable: {describe(e, storage)}") from None


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise RecmixError(f"not found: {path}") from None
    except OSError as e:
        raise RecmixError(f"cannot read {path}: {describe(e)}") from None


def temp_name(path: str) -> str:
    """A sibling name that no reader takes for data: hidden (dataset discovery skips '.' and '_' names)
    and without the final extension."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{os.getpid()}" if head else f".{tail}.tmp-{os.getpid()}"


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Local: write a temp file and rename. S3: a single PUT is already all-or-nothing."""
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
            tmp = temp_name(path)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                _remove_quietly(tmp)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise RecmixError(f"cannot write {path}: {describe(e)}") from None


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_via_temp(fs: pafs.FileSystem, path: str, write) -> None:
    """`write(tmp)` to a hidden temporary name, then move it to `path`: an interrupted write never leaves
    a truncated file under the final name (on S3 too, where closing an interrupted upload would publish
    what was sent so far). The temporary is removed on any failure, Ctrl-C included."""
    tmp = temp_name(path)
    try:
        write(tmp)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def read_json(fs: pafs.FileSystem, path: str) -> dict:
    return json.loads(read_bytes(fs, path))
