"""`kind: serve`: deploy a model artifact as the Ranker application on Ray Serve (docs/serving.md).

`recmix run serve.yaml` on the embedded cluster serves until Ctrl-C, then deletes the application and stops
the cluster; with `--address` (or `cluster.address` other than local) it deploys onto that cluster and returns.
With a `sample:` section, sample requests check the deployed application first (latency, served vs offline
scores); `lifetime: stop` then removes it (a pipeline's last stage). The artifact is checked before Ray
starts, so a wrong URI or version is one line, exit 2.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.serve import Lifetime, ServeSpec

from .config import with_absolute_artifact


def artifact_uri(spec: ServeSpec) -> str:
    """The version folder the spec names (LATEST resolved), or a RecmixError naming what is missing."""
    from recmix.models.artifact import read_doc, resolve_version

    uri = spec.artifact.uri
    if spec.artifact.version != "LATEST":
        uri = storage.join(uri.rstrip("/"), spec.artifact.version)
    uri = resolve_version(uri, spec.storage)
    doc = read_doc(uri, spec.storage)
    if spec.embeddings.mode.value == "shard_group" and not doc.get("embeddings"):
        raise RecmixError(f"embeddings.mode: shard_group needs an artifact with an embedding snapshot (a "
                          f"parameter-server run's); {uri} has none: use mode replica")
    return uri


def deploy(spec: ServeSpec, log: Callable[[str], None] = print) -> str:
    """Start Serve's proxy on spec.http (ignored by Serve if it already runs) and deploy; returns the base URL.
    Blocks until the application is RUNNING (a replica that cannot load the artifact fails here)."""
    from ray import serve

    from recmix.platform.cluster import is_loopback

    from .app import application

    if not is_loopback(spec.http.host):
        log(f"[serve] WARNING: the ranking API will listen on {spec.http.host}:{spec.http.port}, reachable from other "
            "machines; authentication in force: NONE (the ranking API has none: put it behind your own gateway)")
    serve.start(http_options={"host": spec.http.host, "port": spec.http.port})
    serve.run(application(spec), name=spec.name, route_prefix=spec.http.route_prefix, blocking=False)
    prefix = spec.http.route_prefix.rstrip("/")
    url = f"http://{spec.http.host}:{spec.http.port}{prefix}"
    log(f"[serve] {spec.name}: POST {url}/v1/rank  (health {url}/v1/health, OpenAPI {url}/openapi.json)")
    return url


def run(spec: ServeSpec, cluster: Optional[ClusterConfig] = None, *,
        log: Callable[[str], None] = lambda s: print(s, flush=True), wait: Callable[[], None] = None) -> dict:
    from ray import serve

    from recmix.platform import cluster as ray_cluster

    cfg = cluster or spec.cluster
    spec = with_absolute_artifact(spec)
    uri = artifact_uri(spec)
    log(f"[serve] model {uri}")
    local = cfg.address == "local"
    with ray_cluster.cluster(cfg, echo=log):   # inside a pipeline: its cluster, left running
        url = deploy(spec, log)
        out = {"url": url, "artifact": uri, "app": spec.name}
        try:
            if spec.sample is not None:
                from . import sample

                out["sample"] = sample.run(spec, _client_url(spec, url), uri, log)
            if spec.lifetime is Lifetime.stop:
                log(f"[serve] lifetime stop: removing '{spec.name}'")
            elif not local:
                log(f"[serve] deployed onto {cfg.address}; remove it with `serve shutdown` or "
                    f"serve.delete('{spec.name}')")
                return out
            else:
                log("[serve] serving until Ctrl-C")
                (wait or _forever)()
        except KeyboardInterrupt:   # the way to stop a server: a clean stop, exit 0
            log("[serve] Ctrl-C: stopping")
        finally:
            if local or spec.lifetime is Lifetime.stop:
                # an embedded cluster's Serve goes with it; on a joined cluster only this application
                serve.shutdown() if local else serve.delete(spec.name)
                log("[serve] stopped")
    return out


def _client_url(spec: ServeSpec, url: str) -> str:
    """The URL a client on this machine uses (a wildcard bind address is not one to connect to)."""
    host = spec.http.host
    return url.replace(f"//{host}:", "//127.0.0.1:", 1) if host in ("0.0.0.0", "::") else url


def _forever() -> None:
    while True:
        time.sleep(3600)
