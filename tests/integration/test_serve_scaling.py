"""Autoscaling and replica failure under HTTP load (short delays in the spec, Serve facts of ray.md §3.5):
1 replica -> 2 under load; a replica killed by pid leaves >= 99% of requests successful and is replaced;
back to 1 after the load."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from recmix.platform.cluster import free_port
from recmix.platform.specs.serve import ServeSpec
from tests.integration.test_serve_http import Load
from tests.serve_fixture import write_artifact

pytestmark = pytest.mark.slow
APP = "ranker_scaling"


def running(serve) -> int:
    app = serve.status().applications.get(APP)
    return app.deployments["Ranker"].replica_states.get("RUNNING", 0) if app else 0


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


def test_autoscale_and_replica_kill(ray_cluster, tmp_path):
    from ray import serve

    from recmix.jobs.serve import deploy

    spec = ServeSpec.model_validate({
        "kind": "serve", "name": APP, "artifact": {"uri": write_artifact(str(tmp_path / "a"))},
        "replicas": {"min": 1, "max": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 2,
                     "look_back_period_s": 11, "cpus": 0.25, "max_ongoing_requests": 4},
        "batching": {"max_batch_size": 1}, "http": {"port": free_port()}})
    url = deploy(spec, log=lambda s: None)
    try:
        assert running(serve) == 1
        with Load(url, threads=4) as load:
            wait_for(lambda: running(serve) >= 2, 60, "a second replica under load")
            pids: set[int] = set()
            wait_for(lambda: len(pids) >= 2 or pids.add(requests.get(f"{url}/v1/health", timeout=10).json()["pid"]),
                     30, "health answers from both replicas")
            victim = min(pids)
            n0 = len(load.out)
            os.kill(victim, signal.SIGKILL)

            def replaced() -> bool:
                pids.add(requests.get(f"{url}/v1/health", timeout=10).json()["pid"])
                return len(pids - {victim}) >= 2 and running(serve) >= 2

            wait_for(replaced, 60, "the killed replica's replacement")
            wait_for(lambda: len(load.out) - n0 >= 300, 60, "300 requests since the kill")
        during = load.out[n0:]
        failed = [o for o in during if o[0] != 200]
        print(f"replica kill: {len(failed)} of {len(during)} requests failed: {failed[:5]}")
        assert len(failed) <= 0.01 * len(during), (len(during), failed[:5])
        wait_for(lambda: running(serve) == 1, 60, "the return to 1 replica after the load")
    finally:
        serve.delete(APP)
