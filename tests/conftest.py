"""Fixtures shared by both tiers: data paths, thread settings, one S3-compatible server per session.

Two tiers: `tests/unit` (no Ray: `ray.init` raises there) and `tests/integration` (one shared local Ray
cluster per session). `testpaths` runs the unit tier first, so no cluster exists while it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Without a GPU, Triton kernels can only run in Triton's CPU interpreter. The flag is read when a kernel is
# decorated, so it is set here, before any test module imports one (kernel tests compare against references).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers take S3 credentials from their node's environment (never from a runtime_env), and a local
# cluster's nodes inherit the environment of the process that starts it: the moto credentials are set before
# any test starts one, whichever fixture comes first. No instance-metadata probes on machines without one.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]
# Only tests may know where the shared copy lives; code, docs and examples read RECMIX_ML100K.
SHARED_ML100K = REPO.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The MovieLens-100K folder: RECMIX_ML100K if set, else the shared copy; RECMIX_ML100K is set to it
    for the session (examples and benches read it from there)."""
    path = Path(os.environ.get("RECMIX_ML100K") or SHARED_ML100K)
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {path} (set RECMIX_ML100K)")
    saved = os.environ.get("RECMIX_ML100K")
    os.environ["RECMIX_ML100K"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("RECMIX_ML100K", None)
    else:
        os.environ["RECMIX_ML100K"] = saved


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention on a loaded 2-core CI box (10x slower measured)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as a subprocess on a free 127.0.0.1 port; yields its endpoint URL."""
    from recmix.platform.cluster import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the session's S3 server."""
    import uuid

    import pyarrow.fs as pafs

    name = f"recmix-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir(name)
    return name
