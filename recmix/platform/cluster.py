"""Start or connect to Ray the one way recmix does it.

* `address="local"` always starts a fresh cluster (a stale `ray_current_cluster` file cannot capture it),
  in a per-run temp dir, with the dashboard bound to 127.0.0.1 unless configured.
* Token authentication stays as Ray sets it (on by default for new local clusters). `RAY_AUTH_MODE` is
  read when `ray` is imported, so it must be exported in the shell, never set here after the import.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

from recmix.platform.specs.cluster import ClusterConfig


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(cfg: Optional[ClusterConfig] = None, *, include_dashboard: bool = True, quiet: bool = True):
    """Start (address=local) or join a Ray cluster; returns the `ray.init` context. Idempotent."""
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        return ray.get_runtime_context()
    if cfg.address != "local":
        return ray.init(address=cfg.address, log_to_driver=not quiet)
    # Short path: Ray's unix sockets live under the temp dir and must stay below ~100 characters.
    tmp = tempfile.mkdtemp(prefix="rmx-", dir="/tmp")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ctx = ray.init(
        address="local",
        num_cpus=cfg.num_cpus if cfg.num_cpus is not None else max(4, os.cpu_count() or 1),
        include_dashboard=include_dashboard,
        dashboard_host=cfg.dashboard_host,
        dashboard_port=cfg.dashboard_port or free_port(),
        _metrics_export_port=free_port(),
        _temp_dir=tmp,
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level="WARNING",
    )
    _TEMP_DIRS.append(tmp)
    return ctx


_TEMP_DIRS: list[str] = []


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


@contextmanager
def cluster(cfg: Optional[ClusterConfig] = None, **kw) -> Iterator[object]:
    """Connect for the duration of a block; only shuts down what this block started."""
    import ray

    owned = not ray.is_initialized()
    ctx = connect(cfg, **kw)
    try:
        yield ctx
    finally:
        if owned:
            shutdown()
