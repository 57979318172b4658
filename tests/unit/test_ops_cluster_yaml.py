"""cluster.yaml and deploy/cluster-onprem.yaml pass Ray's own cluster-config validation (no cloud calls);
a misspelled key fails it. The validator is private Ray API: the Ray version is pinned in pyproject.toml."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["cluster.yaml", "deploy/cluster-onprem.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _validate(cfg: dict) -> dict:
    cfg = prepare_config(copy.deepcopy(cfg))  # merges the provider's defaults, which validate_config needs
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_valid(name):
    _validate(_load(name))


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_recmix_and_starts_ray_with_the_token(name):
    cfg = _load(name)
    assert cfg["file_mounts"]["~/recmix"] == "."
    assert any("pip install" in c and "~/recmix" in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_cloud_cluster_head_takes_no_work_and_workers_autoscale():
    cfg = _validate(_load("cluster.yaml"))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    for t in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[t]["min_workers"] < types[t]["max_workers"] <= cfg["max_workers"]


def test_onprem_head_takes_no_work():
    assert "--num-cpus=0" in " ".join(_load("deploy/cluster-onprem.yaml")["head_start_ray_commands"])


MISSPELLED = [
    ("cluster.yaml", lambda c: c.update(max_wokers=c.pop("max_workers"))),
    ("cluster.yaml", lambda c: c["available_node_types"]["gpu_worker"].update(
        min_worker=c["available_node_types"]["gpu_worker"].pop("min_workers"))),
    ("cluster.yaml", lambda c: c.update(setup_command=c.pop("setup_commands"))),
    ("deploy/cluster-onprem.yaml", lambda c: c.update(head_start_ray_command=c.pop("head_start_ray_commands"))),
    ("deploy/cluster-onprem.yaml", lambda c: c.update(file_mount=c.pop("file_mounts"))),
]


@pytest.mark.parametrize("name,mutate", MISSPELLED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MISSPELLED)])
def test_a_misspelled_key_fails(name, mutate):
    cfg = _load(name)
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        _validate(cfg)


def test_an_unknown_head_node_type_fails():
    cfg = _load("cluster.yaml")
    cfg["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(cfg)
