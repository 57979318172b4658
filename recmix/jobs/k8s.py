"""`recmix k8s SPEC [--image IMAGE]`: KubeRay manifests for a job spec (docs/operations.md).

* Every kind: a RayCluster (a long-lived cluster to `recmix submit` to).
* prepare / train / pipeline / bench: a RayJob (its own cluster, deleted when the job ends) whose head mounts
  the spec from a ConfigMap and runs `python -m recmix.jobs.cli run`; inside the job `address: local` joins
  the job's cluster (RAY_ADDRESS), so the spec needs no change.
* serve: a RayService whose `serveConfigV2` is the spec's Serve config (`recmix serve-config`), with the proxy
  bound to the pod address (the Kubernetes Service and NetworkPolicy are the boundary there).
Conventions (KubeRay v1.7.0): `rayStartParams` values are strings; the head takes no work (`num-cpus: "0"`);
head container `ray-head` with ports gcs 6379, dashboard 8265, client 10001, metrics 8080 (+ serve 8000);
token authentication (`authOptions.mode: token`); the image must hold recmix and Ray 2.60 (deploy/Dockerfile).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import recmix
from recmix.platform.errors import RecmixError

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = f"recmix:{recmix.__version__}"
METRICS_PORT = 8080
SPEC_DIR = "/etc/recmix"
JOB_KINDS = ("prepare", "train", "pipeline", "bench")
HEAD_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": METRICS_PORT}
# (groupName, replicas, minReplicas, maxReplicas, cpu, memory, gpus)
CPU_GROUP = ("cpu", 1, 1, 8, "8", "32Gi", 0)
GPU_GROUP = ("gpu", 0, 0, 4, "8", "32Gi", 1)


def k8s_name(stem: str) -> str:
    """A DNS-1123 label from a file stem: lower case, [a-z0-9-], at most 40 characters (room for suffixes)."""
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:40].strip("-")
    if not name:
        raise RecmixError(f"cannot derive a Kubernetes name from '{stem}': give the spec file a name with letters or digits")
    return name


def _container(name: str, image: str, cpu: str, memory: str, gpus: int, ports: dict[str, int], mounts: list) -> dict:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    c = {"name": name, "image": image, "resources": {"limits": limits, "requests": {"cpu": cpu, "memory": memory}},
         "env": [{"name": "RAY_DATA_DISABLE_PROGRESS_BARS", "value": "1"}]}
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports.items()]
    if mounts:
        c["volumeMounts"] = mounts
    return c


def cluster_spec(image: str, kind: str, spec_configmap: Optional[str] = None) -> dict:
    ports = dict(HEAD_PORTS, **({"serve": 8000} if kind == "serve" else {}))
    mounts = [{"name": "recmix-spec", "mountPath": SPEC_DIR, "readOnly": True}] if spec_configmap else []
    head_pod: dict = {"containers": [_container("ray-head", image, "2", "8Gi", 0, ports, mounts)]}
    if spec_configmap:
        head_pod["volumes"] = [{"name": "recmix-spec", "configMap": {"name": spec_configmap}}]
    groups = [CPU_GROUP] if kind in ("prepare", "bench") else [CPU_GROUP, GPU_GROUP]
    workers = []
    for group, replicas, lo, hi, cpu, mem, gpus in groups:
        workers.append({"groupName": group, "replicas": replicas, "minReplicas": lo, "maxReplicas": hi,
                        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
                        "template": {"spec": {"containers": [_container("ray-worker", image, cpu, mem, gpus,
                                                                         {"metrics": METRICS_PORT}, [])]}}})
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": 600, "upscalingMode": "Default"},
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
            "serviceType": "ClusterIP",
            "template": {"spec": head_pod},
        },
        "workerGroupSpecs": workers,
    }


def _meta(name: str) -> dict:
    return {"name": name, "labels": {"app.kubernetes.io/name": "recmix", "app.kubernetes.io/instance": name}}


def manifests(spec, spec_text: str, name: str, image: str = DEFAULT_IMAGE) -> dict[str, list[dict]]:
    """file suffix -> the documents of that file."""
    out = {"raycluster": [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(name),
                           "spec": cluster_spec(image, spec.kind)}]}
    if spec.kind in JOB_KINDS:
        cm = f"{name}-spec"
        out["rayjob"] = [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(cm), "data": {"spec.yaml": spec_text}},
            {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(name),
             "spec": {"entrypoint": f"python -m recmix.jobs.cli run {SPEC_DIR}/spec.yaml",
                      "entrypointNumCpus": 0,  # the driver takes no CPU (the head has none anyway)
                      "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                      "rayClusterSpec": cluster_spec(image, spec.kind, spec_configmap=cm)}},
        ]
    elif spec.kind == "serve":
        import yaml

        from recmix.jobs.serve.config import serve_config

        if "://" not in spec.artifact.uri:
            print(f"recmix k8s: warning: artifact.uri {spec.artifact.uri} is a local path; every RayService pod must "
                  "see it there (a mounted volume), else give an s3:// URI", file=sys.stderr)
        config = serve_config(spec)
        config["http_options"]["host"] = "0.0.0.0"  # reachable through the RayService's Kubernetes Service
        out["rayservice"] = [{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _meta(name),
                              "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False),
                                       "rayClusterConfig": cluster_spec(image, spec.kind)}}]
    return out


def dump(docs: list[dict]) -> str:
    """YAML documents; multi-line strings (the spec, serveConfigV2) as literal blocks, readable in review."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False)


def write(spec_path: str, out_dir: str, image: str = DEFAULT_IMAGE) -> list[Path]:

    from recmix.platform.specs.load import load_spec

    spec = load_spec(spec_path)
    text = Path(spec_path).read_text()
    name = k8s_name(Path(spec_path).stem)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, docs in manifests(spec, text, name, image).items():
        path = out / f"{name}-{suffix}.yaml"
        header = f"# Generated by `recmix k8s {Path(spec_path).name} --image {image}` (recmix {recmix.__version__}); do not edit.\n"
        path.write_text(header + dump(docs))
        written.append(path)
    return written


def _cmd_k8s(args) -> int:
    for path in write(args.spec, args.out, args.image):
        print(f"{path}: kubectl apply -f {path}")
    return 0


def add_parser(sub) -> None:
    k = sub.add_parser("k8s", help="write KubeRay manifests (RayCluster, RayJob or RayService) for a job spec")
    k.add_argument("spec", help="path to the job spec file")
    k.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image with recmix and Ray {RAY_VERSION} (default: {DEFAULT_IMAGE})")
    k.add_argument("-o", "--out", default=".", help="output folder (default: the current one)")
    k.set_defaults(fn=_cmd_k8s)
