"""`recmix k8s` manifests validate strictly against the KubeRay v1.7.0 CRD schemas (unknown keys fail, as
`kubectl --validate=strict` would) and follow the conventions; deploy/kuberay/ is what the generator writes."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import jsonschema
import pytest
import yaml

from recmix.jobs import k8s

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "data" / "kuberay-v1.7.0"   # the CRD schemas of KubeRay v1.7.0 (Apache-2.0), vendored
PLURAL = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
# what deploy/kuberay was generated with (a RayService's spec is expanded at generation: pods need remote URIs)
EXAMPLE_ENV = {"RECMIX_ML100K": "s3://recmix-data/ml-100k.zip", "RECMIX_ARTIFACTS": "s3://recmix-artifacts"}
# examples whose manifests ship in deploy/kuberay (an example added later is validated, not compared)
SHIPPED = ["pipeline-ml100k.yaml", "prepare-ml100k.yaml", "prepare-synthetic.yaml", "quickstart.yaml", "serve.yaml",
           "train-ml100k-ps.yaml", "train-ml100k.yaml"]


def strictify(schema):
    """additionalProperties: False on every object with properties that leaves it open (unless it preserves
    unknown fields)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for v in schema.values():
            strictify(v)
    elif isinstance(schema, list):
        for v in schema:
            strictify(v)
    return schema


@pytest.fixture(scope="module")
def validators():
    out = {}
    for kind, plural in PLURAL.items():
        crd = yaml.load(gzip.open(CRDS / f"ray.io_{plural}.yaml.gz"), Loader=yaml.CSafeLoader)
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
        out[kind] = jsonschema.Draft7Validator(strictify(schema))
    return out


def _errors(validators, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


def _serve_spec(tmp_path) -> Path:
    p = tmp_path / "ranker.yaml"
    p.write_text("kind: serve\nname: ranker\nartifact: {uri: s3://recmix/model/artifact}\n"
                 "replicas: {min: 1, max: 4, gpus: 1}\n")
    return p


def _generated(tmp_path, monkeypatch, spec: Path) -> list[dict]:
    for k, v in EXAMPLE_ENV.items():
        monkeypatch.setenv(k, v)
    docs = []
    for path in k8s.write(str(spec), str(tmp_path / "out")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_validate_and_are_what_the_generator_writes(validators, tmp_path, monkeypatch, example):
    docs = _generated(tmp_path, monkeypatch, REPO / "examples" / example)
    kinds = [d["kind"] for d in docs]
    job_kind = "RayService" if yaml.safe_load((REPO / "examples" / example).read_text())["kind"] == "serve" else "RayJob"
    assert "RayCluster" in kinds and job_kind in kinds, kinds
    for d in docs:
        if d["kind"] in PLURAL:
            assert not _errors(validators, d), _errors(validators, d)
    if example not in SHIPPED:
        return
    for path in (tmp_path / "out").iterdir():
        shipped = REPO / "deploy" / "kuberay" / path.name
        stale = f"deploy/kuberay/{path.name} is stale: regenerate with `recmix k8s examples/{example} -o deploy/kuberay`"
        assert shipped.is_file(), stale
        if not path.name.endswith("-rayservice.yaml"):
            assert shipped.read_text() == path.read_text(), stale
            continue
        # the Serve config itself is the serve job's (`recmix serve-config`): compared apart from it, validated
        new, old = yaml.safe_load(path.read_text()), yaml.safe_load(shipped.read_text())
        assert not _errors(validators, old), _errors(validators, old)
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(old["spec"].pop("serveConfigV2")))
        new["spec"].pop("serveConfigV2")
        assert new == old, stale


def test_serve_spec_gives_a_rayservice_with_the_serve_config(validators, tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    docs = _generated(tmp_path, monkeypatch, _serve_spec(tmp_path))
    svc = next(d for d in docs if d["kind"] == "RayService")
    assert not _errors(validators, svc), _errors(validators, svc)
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    from recmix.jobs.serve.config import serve_config
    from recmix.platform.specs.load import load_spec

    expected = serve_config(load_spec(str(_serve_spec(tmp_path))))  # the serve job's own config, the proxy host apart
    assert config["applications"] == expected["applications"]
    assert config["http_options"] == {**expected["http_options"], "host": "0.0.0.0"}
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    assert "RayJob" not in [d["kind"] for d in docs]


def test_conventions(tmp_path, monkeypatch):
    docs = _generated(tmp_path, monkeypatch, REPO / "examples" / "train-ml100k.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    # the ConfigMap holds the spec as written: ${VAR} expands on the cluster
    assert cm["data"]["spec.yaml"] == (REPO / "examples" / "train-ml100k.yaml").read_text()
    assert job["spec"]["entrypoint"] == "python -m recmix.jobs.cli run /etc/recmix/spec.yaml"
    assert job["spec"]["entrypointNumCpus"] == 0
    for d in docs:
        if d["kind"] not in PLURAL:
            continue
        cluster = d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # the head takes no work
        groups = [head] + cluster["workerGroupSpecs"]
        assert all(isinstance(v, str) for g in groups for v in g["rayStartParams"].values())
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
        assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
        assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"] == {"mode": "token"}
        names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
        assert names == ["cpu", "gpu"]
        gpu = cluster["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert gpu["nvidia.com/gpu"] == "1"


def _mutations():
    def typo_worker(d):
        w = _cluster(d)["workerGroupSpecs"][0]
        w["maxReplica"] = w.pop("maxReplicas")

    def int_param(d):
        _cluster(d)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0

    def typo_top(d):
        d["spec"]["shutdownAfterJobFinish"] = d["spec"].pop("shutdownAfterJobFinishes", True)

    def typo_container(d):
        c = _cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0]
        c["port"] = c.pop("ports")

    return {"worker maxReplica": (typo_worker, "maxReplica"), "integer rayStartParams": (int_param, "is not of type 'string'"),
            "RayJob shutdownAfterJobFinish": (typo_top, "shutdownAfterJobFinish"), "container port": (typo_container, "'port'")}


def _cluster(d):
    return d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]


CASES = [(k, m) for k in ("RayJob", "RayCluster", "RayService") for m in _mutations() if k == "RayJob" or not m.startswith("RayJob")]


@pytest.mark.parametrize("kind,mutation", CASES)
def test_a_misspelled_key_fails(validators, tmp_path, monkeypatch, kind, mutation):
    spec = _serve_spec(tmp_path) if kind == "RayService" else REPO / "examples" / "prepare-synthetic.yaml"
    doc = copy.deepcopy(next(d for d in _generated(tmp_path, monkeypatch, spec) if d["kind"] == kind))
    mutate, expected = _mutations()[mutation]
    mutate(doc)
    errors = _errors(validators, doc)
    assert any(expected in e for e in errors), errors


def test_k8s_names():
    assert k8s.k8s_name("Train_ML100K.v2") == "train-ml100k-v2"
    with pytest.raises(Exception, match="Kubernetes name"):
        k8s.k8s_name("___")
