"""`recmix submit` against a real `ray start --head` cluster (its own temp dir, ports and token), stopped afterwards.

The head is started once for the module and stopped by pid (never `ray stop`, which kills every Ray process of
the user, the shared test cluster included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from recmix.platform import cleanup
from recmix.platform.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from recmix.jobs.cli import main; sys.exit(main())"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    """A token-authenticated head on 127.0.0.1; yields (dashboard URL, client env)."""
    tmp = tempfile.mkdtemp(prefix="rmxh-", dir="/tmp")  # short: Ray's unix sockets live under it
    dash = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           # the job's driver runs `python` from the head's PATH: this venv's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--temp-dir={tmp}", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}", env, tmp
    finally:
        cleanup.stop_processes(cleanup.processes_using(tmp), grace_s=8.0)
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(env: dict, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_prepare_then_train_succeeds_and_joins_the_cluster(head, tmp_path):
    """A pipeline job: a synthetic prepare, then a tiny Ray Train run on it (1 worker x 0.5 CPU: the 2-CPU head
    keeps a CPU for Ray Data's read tasks), both on the job's cluster."""
    url, env, tmp = head
    out = tmp_path / "data"
    spec = tmp_path / "prep.yaml"
    spec.write_text(f"""kind: pipeline
stages:
  - name: prepare
    spec:
      kind: prepare
      source: {{type: synthetic, n_rows: 2000, n_users: 100, n_items: 50, history_len: 5, chunk_rows: 1000, seed: 0}}
      output: {{uri: {out}}}
  - name: train
    spec:
      kind: train
      dataset: {{uri: {out}}}
      model: {{arch: tokenmixer_large, tokenizer: group_mlp, d_model: 16, n_heads: 4, n_layers: 2}}
      epochs: 1
      batch_size: 256
      threads: 1
      scaling: {{workers: 1, cpus_per_worker: 0.5}}
      output: {tmp_path / "run"}
""")
    r = _submit(env, "submit", str(spec), "--address", url, "--submission-id", "rmx-prep-ok", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # no nested cluster: the driver joined the job's cluster through RAY_ADDRESS
    assert "[ray] joined the cluster at" in r.stdout and "(RAY_ADDRESS)" in r.stdout, r.stdout
    assert "started a local cluster" not in r.stdout, r.stdout
    assert "[prepare] synthetic" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout
    assert (out / "_manifest.json").exists() or list(out.glob("*/_manifest.json")), list(out.rglob("*"))
    assert "[train] test AUC " in r.stdout and (tmp_path / "run" / "artifact" / "LATEST").exists(), r.stdout[-3000:]

    logs = _submit(env, "jobs", "logs", "rmx-prep-ok", "--address", url, timeout=60)
    assert logs.returncode == 0 and "[prepare] synthetic" in logs.stdout, logs.stdout + logs.stderr
    listed = _submit(env, "jobs", "list", "--address", url, timeout=60)
    assert "rmx-prep-ok" in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout


def test_failing_job_exits_non_zero(head, tmp_path):
    url, env, _ = head
    spec = tmp_path / "bad.yaml"
    # valid here, fails on the cluster: its output location cannot be written
    spec.write_text("kind: prepare\nsource: {type: synthetic, n_rows: 2000, n_users: 100, n_items: 50, history_len: 5}\n"
                    "output: {uri: /proc/recmix-not-writable/data}\n")
    r = _submit(env, "submit", str(spec), "--address", url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout, r.stdout


def test_without_the_token_submit_is_refused_in_one_line(head, tmp_path):
    url, env, _ = head
    r = _submit({**env, "RAY_AUTH_TOKEN": "wrong" * 8}, "jobs", "list", "--address", url, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr


def test_ray_job_submit_of_recmix_run_joins_as_well(head, tmp_path):
    """Ray's own CLI (recmix installed on the cluster: the head runs this venv)."""
    url, env, _ = head
    work = tmp_path / "wd"
    work.mkdir()
    (work / "spec.yaml").write_text(f"kind: prepare\nsource: {{type: synthetic, n_rows: 1000, n_users: 50, n_items: 20, "
                                    f"history_len: 3}}\noutput: {{uri: {tmp_path / 'out'}}}\n")
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", url, "--working-dir", str(work),
                        "--entrypoint-num-cpus", "0", "--", "recmix", "run", "spec.yaml"],
                       env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(RAY_ADDRESS)" in r.stdout and "started a local cluster" not in r.stdout, r.stdout[-3000:]
