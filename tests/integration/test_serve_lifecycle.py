"""`recmix run serve.yaml`: on its own embedded cluster it serves until Ctrl-C and stops cleanly (exit 0, the
port closed); with `--address` it deploys onto a running cluster and returns, the app left serving there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml

from recmix.platform.cluster import free_port
from tests.serve_fixture import request_rows, write_artifact

pytestmark = pytest.mark.slow
CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from recmix.jobs.cli import main; sys.exit(main(sys.argv[1:]))")


def spec_file(tmp_path, port: int, name: str) -> str:
    root = write_artifact(str(tmp_path / "artifact"))
    spec = {"kind": "serve", "name": name, "artifact": {"uri": root}, "replicas": {"cpus": 0.25},
            "http": {"port": port}, "cluster": {"num_cpus": 2}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:   # not up yet: refused, or accepted and not answering
            pass
        time.sleep(1)
    pytest.fail(f"{url} never became healthy")


def test_run_serves_until_ctrl_c(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", spec_file(tmp_path, port, "lifecycle")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 150
        while not any("[serve] serving until Ctrl-C" in x for x in lines):   # deployed (a Ctrl-C before is exit 130)
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.5)
        wait_healthy(url)
        assert requests.post(f"{url}/v1/rank", json=request_rows(3), timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        reader.join(timeout=10)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "[serve] serving until Ctrl-C" in out and "[serve] stopped" in out
    with pytest.raises(requests.RequestException):
        requests.get(f"{url}/v1/health", timeout=2)


def test_run_with_address_deploys_and_returns(ray_cluster, tmp_path):
    from ray import serve

    port = free_port()
    gcs = ray_cluster.address_info["gcs_address"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    token = os.path.expanduser("~/.ray/auth_token")
    if os.path.exists(token):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    res = subprocess.run([sys.executable, "-c", CLI, "run", spec_file(tmp_path, port, "joined"), "--address", gcs],
                         env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"[serve] deployed onto {gcs}" in res.stdout
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60)
        r = requests.post(f"http://127.0.0.1:{port}/v1/rank", json=request_rows(2), timeout=30)
        assert r.status_code == 200 and len(r.json()["scores"]) == 2
    finally:
        serve.shutdown()
