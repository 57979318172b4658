"""`recmix serve-config SPEC`: the Serve config file (`serve deploy` / KubeRay `serveConfigV2`) of a serve spec.

The application's import path is `recmix.jobs.serve.app:build_app` with the whole validated spec as its args,
so the replicas run the same checks as `recmix run`; the deployment options are repeated under
`deployments:` where operators expect them. recmix must be installed on every node (no working_dir upload).
"""

from __future__ import annotations

import os

from recmix.platform.specs.serve import ServeSpec

IMPORT_PATH = "recmix.jobs.serve.app:build_app"


def with_absolute_artifact(spec: ServeSpec) -> ServeSpec:
    """A local artifact path made absolute: replicas (and `serve deploy`) do not share this process's cwd."""
    uri = spec.artifact.uri
    if "://" in uri:
        return spec
    return spec.model_copy(update={"artifact": spec.artifact.model_copy(update={"uri": os.path.abspath(uri)})})


def deployment_options(spec: ServeSpec) -> dict:
    r = spec.replicas
    opts: dict = {"max_ongoing_requests": r.max_ongoing_requests,
                  "ray_actor_options": {"num_cpus": r.cpus, "num_gpus": r.gpus}}
    if r.min == r.max:
        opts["num_replicas"] = r.min
    else:
        opts["autoscaling_config"] = {"min_replicas": r.min, "max_replicas": r.max,
                                      "target_ongoing_requests": r.target_ongoing_requests,
                                      "upscale_delay_s": r.upscale_delay_s, "downscale_delay_s": r.downscale_delay_s,
                                      "look_back_period_s": r.look_back_period_s}
    return opts


def serve_config(spec: ServeSpec) -> dict:
    """The spec's artifact URI as written (a KubeRay pod resolves it in its own file system)."""
    opts = deployment_options(spec)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": spec.http.host, "port": spec.http.port},
        "applications": [{
            "name": spec.name,
            "route_prefix": spec.http.route_prefix,
            "import_path": IMPORT_PATH,
            "args": {"spec": spec.model_dump(mode="json")},
            "deployments": [{"name": "Ranker", **opts}],
        }],
    }


def write(spec: ServeSpec, path: str) -> None:
    import yaml

    with open(path, "w") as f:   # for `serve deploy` from this machine: a local path as this machine sees it
        yaml.safe_dump(serve_config(with_absolute_artifact(spec)), f, sort_keys=False)
