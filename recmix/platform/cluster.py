"""Start or connect to Ray the one way recmix does it.

* `address="local"` always starts a fresh cluster (a stale `ray_current_cluster` file cannot capture it),
  in a per-run temp dir, with the dashboard bound to 127.0.0.1 unless configured.
* Token authentication stays as Ray sets it (on by default for new local clusters). `RAY_AUTH_MODE` is
  read when `ray` is imported, so it must be exported in the shell, never set here after the import. Joining a
  cluster whose token this process lacks fails after Ray's ~20 s of retries; `connect` turns that into one
  RecmixError line saying what to export.
* Every start or join prints one `[ray]` line with the dashboard URL (or why there is none).
* Where `RAY_ADDRESS` names a cluster (a Ray job's driver: `recmix submit`, `ray job submit -- recmix run`),
  `address: local` joins that cluster instead of starting a nested one, and worker logs go to the driver (so
  they reach the job's logs).
* The driver's actors live in the Ray namespace `recmix` (named groups may set their own).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from recmix.platform import cleanup
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig

NAMESPACE = "recmix"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTUP_TIMEOUT = "timed out during startup"   # ray/_private/node.py, a plain Exception


def connect(
    cfg: Optional[ClusterConfig] = None, *, include_dashboard: bool = True, quiet: bool = True, echo: Callable[[str], None] = print
):
    """Start (address=local) or join a Ray cluster; returns the `ray.init` context. Idempotent."""
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        return ray.get_runtime_context()
    ambient = os.environ.get("RAY_ADDRESS", "").strip()
    if cfg.address != "local" or ambient:
        # inside a Ray job the ambient cluster wins over `local`: a nested cluster would compete for its CPUs
        address = ambient if cfg.address == "local" else cfg.address
        try:
            ctx = ray.init(address=address, namespace=NAMESPACE, log_to_driver=(address == ambient) or not quiet)
        except ConnectionError as e:
            hint = " (named by RAY_ADDRESS: unset it to start a local cluster instead)" if address == ambient else ""
            raise RecmixError(_join_failure(address, e) + hint) from None
        why = " (RAY_ADDRESS)" if address == ambient else ""
        echo(f"[ray] joined the cluster at {address}{why}; {_dashboard(ctx.dashboard_url, 'the cluster runs without one')}")
        return ctx
    cleanup.sweep_stale()  # what a SIGKILLed run left behind
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for attempt in (1, 2):
        # Short path: Ray's unix sockets live under the temp dir and must stay below ~100 characters.
        tmp = tempfile.mkdtemp(prefix=cleanup.temp_prefix(), dir=cleanup.TEMP_ROOT)
        _TEMP_DIRS.append(tmp)  # before ray.init: a Ctrl-C during start-up still removes it and its processes
        try:
            ctx = ray.init(
                address="local",
                namespace=NAMESPACE,
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
            break
        except BaseException as e:
            shutdown()
            # Ray gives a new node a fixed 30 s to register with its GCS; a loaded machine can miss that once
            if STARTUP_TIMEOUT not in str(e):
                raise
            if attempt == 2:
                raise RecmixError("the local Ray cluster did not start: its node missed Ray's 30 s startup window twice "
                                  "(the machine is overloaded?); retry when it is less busy") from None
            echo("[ray] the local node missed Ray's 30 s startup window; starting it once more")
    # Ray makes its temp dir world-writable; the session's logs and sockets are for this user only.
    os.chmod(tmp, 0o700)
    echo(f"[ray] started a local cluster; {_dashboard(ctx.dashboard_url, 'include_dashboard is off')}")
    if include_dashboard:
        _warn_exposure(cfg, echo)  # after ray.init: the authentication mode is settled by then
    return ctx


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _warn_exposure(cfg: ClusterConfig, echo: Callable[[str], None]) -> None:
    """Binding a service beyond loopback is allowed, but never silently."""
    if not is_loopback(cfg.dashboard_host):
        echo(f"[ray] WARNING: the dashboard (and its job, state and log APIs) will listen on {cfg.dashboard_host}, "
             f"reachable from other machines; authentication in force: {_auth_in_force()}")


def _auth_in_force() -> str:
    mode = _auth_mode()
    if mode == "token":
        return "Ray token authentication (RAY_AUTH_MODE=token: requests need the cluster token)"
    if mode == "disabled":
        return "NONE (RAY_AUTH_MODE=disabled: anyone who can reach the port controls the cluster)"
    return f"RAY_AUTH_MODE={mode} (check it: without token authentication anyone who can reach the port controls the cluster)"


def dashboard_url() -> Optional[str]:
    """http://host:port of the connected cluster's dashboard, None when it runs without one or none is connected."""
    import ray

    if not ray.is_initialized():
        return None
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return f"http://{url}" if url else None


def _dashboard(url: Optional[str], why_none: str) -> str:
    # Ray reports host:port without a scheme
    return f"dashboard http://{url}" if url else f"no dashboard ({why_none})"


def _auth_mode() -> str:
    try:
        from ray._private.authentication.authentication_utils import get_authentication_mode_name
        from ray._raylet import get_authentication_mode

        return get_authentication_mode_name(get_authentication_mode())
    except ImportError:  # pragma: no cover - older Ray without token authentication
        return "unknown"


def _reachable(address: str) -> Optional[bool]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return None  # 'auto' or a ray:// client address: no plain GCS port to probe
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


def _join_failure(address: str, err: ConnectionError) -> str:
    """One line: what went wrong joining `address`, and what to set when it is token authentication."""
    reachable = _reachable(address)
    if reachable is False:
        return f"cannot join the Ray cluster at {address}: nothing accepts connections there ({err})"
    token_hint = (f"export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the cluster's token before "
                  f"running recmix (RAY_AUTH_MODE is '{_auth_mode()}' here; Ray reads it at import)")
    if reachable:
        return f"cannot join the Ray cluster at {address}: it answers but rejected this client, as a cluster with token authentication does; {token_hint}"
    return f"cannot join the Ray cluster at {address} ({err}); if it uses token authentication, {token_hint}"


_TEMP_DIRS: list[str] = []


def shutdown() -> None:
    """Stop the cluster this process started (also one half-started by an interrupted `ray.init`), stop any
    process still running from its temp dir, and delete the temp dir."""
    import ray

    with cleanup.no_interrupt():
        if ray.is_initialized() or _TEMP_DIRS:
            ray.shutdown()  # also kills the processes of a start-up cut short, once Ray has recorded them
        while _TEMP_DIRS:
            cleanup.remove_temp_dir(_TEMP_DIRS.pop())
        cleanup.sweep_stale()  # buffers of worker processes that Ray killed


def _at_exit() -> None:
    if _TEMP_DIRS:  # only a process that started a cluster (never a Ray worker importing this module)
        try:
            shutdown()
        except KeyboardInterrupt:  # a Ctrl-C held off during the cleanup: the process is exiting anyway
            pass


atexit.register(_at_exit)


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
