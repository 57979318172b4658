"""Unit tier: no Ray. Any `ray.init` (explicit or Ray's auto-init on a first `.remote()`) raises here,
so a unit test that reaches for a cluster fails loudly instead of silently starting one."""

from __future__ import annotations

import pytest


class RayUsedInUnitTest(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    if ray.is_initialized():  # an integration test ran first in this process: the guard cannot hold
        pytest.fail("a Ray cluster is up during the unit tier; run tests/unit before tests/integration")

    def refuse(*args, **kwargs):
        raise RayUsedInUnitTest("ray.init called from the unit tier; move the test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
    yield
