"""Whole runs in their own process and cluster (issue 14, items 1 and 6): no secret in any Ray file, state or
output; Ctrl-C at start-up or mid-write leaves no process, temp dir, buffer or truncated file; after SIGKILL
the next run cleans up. Each test starts one Ray cluster of its own (a subprocess), not the shared one."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from recmix.platform import cleanup

REPO = Path(__file__).resolve().parents[2]
SECRET = "rmx-Secret-9f3c1e7a5b2d4c6e8f0a1b3c5d7e9f1a"
SMALL = {"type": "synthetic", "n_rows": 60_000, "n_users": 500, "n_items": 200, "chunk_rows": 10_000, "history_len": 5}
# Ctrl-C as a terminal delivers it, whatever the disposition the test runner inherited.
CLI = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from recmix.jobs.cli import main; sys.exit(main(sys.argv[1:]))"

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, source: dict, output: str, **extra) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"kind": "prepare", "source": source, "output": {"uri": output}, **extra}))
    return path


def _session_processes(pid: int) -> list[int]:
    """Processes of the Ray session the driver `pid` started: Ray names the session dir `session_<time>_<pid>`."""
    pattern = re.compile(rb"session_[0-9_\-]+_%d(/|\x00|$)" % pid)
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if entry.isdigit() and pattern.search(f.read()):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def _leftovers(pid: int) -> list[str]:
    """Temp dirs, processes and shared-memory buffers of the run whose driver was `pid` (by name, not by
    listing the temp dir: a process can outlive the dir it was started in)."""
    temp = glob.glob(os.path.join(cleanup.TEMP_ROOT, f"{cleanup.TEMP_PREFIX}{pid}-*"))
    temp += [os.path.dirname(s) for s in glob.glob(os.path.join(cleanup.TEMP_ROOT, f"{cleanup.TEMP_PREFIX}*", f"session_*_{pid}"))]
    procs = cleanup.processes_using(os.path.join(cleanup.TEMP_ROOT, f"{cleanup.TEMP_PREFIX}{pid}-")) + _session_processes(pid)
    shm = glob.glob(os.path.join(cleanup.SHM_DIR, f"{cleanup.SHM_PREFIX}*-p{pid}-*"))
    return sorted(set(temp)) + [f"pid {p}" for p in sorted(set(procs))] + shm


def _wait_for(what, timeout: float = 120.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the point to interrupt: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("timed out waiting for the point to interrupt")


SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    import ray
    from recmix.jobs.prepare import run
    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.load import load_spec

    secret = sys.argv[2].encode()
    spec = load_spec(sys.argv[1])
    with cluster.cluster(ClusterConfig(num_cpus=2)):
        run(spec, ClusterConfig(num_cpus=2))
        import time
        from ray.util.state import list_tasks
        deadline = time.monotonic() + 30   # task events reach the state API asynchronously (about every second)
        while True:
            tasks = list_tasks(address=cluster.dashboard_url(), detail=True, limit=10000)
            if tasks or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        envs = [str(getattr(t, "runtime_env_info", "")) for t in tasks]
        session = pathlib.Path(ray._private.worker._global_node.get_session_dir_path())
        files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
        hits = [str(p) for p in files if secret in p.read_bytes()]
        print(json.dumps({"tasks": len(tasks), "env_hits": [e for e in envs if sys.argv[2] in e], "files": len(files),
                          "file_hits": hits, "mode": oct(session.parent.stat().st_mode & 0o777)}))
""")


def test_s3_prepare_writes_the_secret_nowhere(tmp_path, s3_server, s3_bucket):
    """The secret reaches the workers through the node's environment only: not in a runtime_env, the state API,
    any file of the Ray session, the output objects, or anything printed."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    uri = f"s3://{s3_bucket}/syn"
    spec = _spec(tmp_path, SMALL, uri, storage={"endpoint_url": s3_server})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(spec), SECRET], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tasks"] >= 1 and report["files"] > 10, report  # the chunks ran as Ray tasks; Ray wrote its logs
    assert report["env_hits"] == [] and report["file_hits"] == [], report
    assert report["mode"] == "0o700", report  # the session is private to its user
    assert SECRET not in proc.stdout + proc.stderr
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing")
    objects = [i.path for i in fs.get_file_info(pafs.FileSelector(s3_bucket, recursive=True)) if i.type == pafs.FileType.File]
    assert any(o.endswith("_manifest.json") for o in objects) and len(objects) >= 7
    for o in objects:
        with fs.open_input_stream(o) as f:
            assert SECRET.encode() not in f.read(), o


def _start(tmp_path: Path, out: Path) -> subprocess.Popen:
    spec = _spec(tmp_path, {**SMALL, "n_rows": 400_000, "chunk_rows": 20_000}, str(out))
    return subprocess.Popen([sys.executable, "-c", CLI, "run", str(spec)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ray_starting(pid: int):
    """True once Ray has started processes of the run's session (ray.init is under way)."""
    return bool(_session_processes(pid))


def _first_part(out: Path):
    return [p for p in out.glob("*/*/part-*.parquet")]


@pytest.mark.parametrize("point", ["ray-start-up", "writing-parts"])
def test_ctrl_c_leaves_nothing(tmp_path, point):
    out = tmp_path / "ds"
    proc = _start(tmp_path, out)
    if point == "ray-start-up":
        _wait_for(lambda: _ray_starting(proc.pid), proc=proc)
    else:
        _wait_for(lambda: _first_part(out), proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "recmix: interrupted (Ctrl-C)"
    assert "Traceback" not in err
    time.sleep(0.5)
    assert _leftovers(proc.pid) == []
    # No file a reader could take for data: every visible parquet file is whole, no temporaries, no manifest.
    for p in out.rglob("*"):
        assert not p.name.startswith("."), f"temporary left: {p}"
        if p.suffix == ".parquet":
            pq.read_metadata(p)
    assert not (out / "_manifest.json").exists()


def test_after_sigkill_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "ds"
    proc = _start(tmp_path, out)
    _wait_for(lambda: _first_part(out), proc=proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = glob.glob(os.path.join(cleanup.TEMP_ROOT, f"{cleanup.TEMP_PREFIX}{proc.pid}-*"))
    assert left, "SIGKILL leaves the temp dir (nothing runs in a killed process)"
    gone = cleanup.sweep_stale()  # what every start (cluster.connect) does first
    assert set(left) <= set(gone)
    time.sleep(0.5)
    assert _leftovers(proc.pid) == []


def test_a_cluster_left_running_is_shut_down_at_exit():
    """A job that connects and never calls shutdown (as the PS train path did) leaves nothing behind."""
    code = ("from recmix.platform import cluster; from recmix.platform.specs.cluster import ClusterConfig; "
            "cluster.connect(ClusterConfig(num_cpus=1), include_dashboard=False); import ray; "
            "import os; print(os.getpid(), ray.get(ray.remote(lambda: 1).remote()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(" 1"), proc.stderr[-2000:]
    pid = int(proc.stdout.strip().splitlines()[-1].split()[0])
    time.sleep(0.5)
    assert _leftovers(pid) == []


@pytest.fixture(scope="module")
def ml100k_prepared(tmp_path_factory, ml100k_dir):
    from recmix.jobs.prepare import run
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.prepare import PrepareSpec

    out = tmp_path_factory.mktemp("ml") / "ds"
    run(PrepareSpec.model_validate({"kind": "prepare", "source": {"type": "movielens100k", "path": str(ml100k_dir)},
                                    "output": {"uri": str(out)}}), ClusterConfig())
    return out


def _train_spec(tmp_path: Path, dataset: Path) -> Path:
    spec = yaml.safe_load((REPO / "examples/train-ml100k.yaml").read_text())
    spec.update(dataset={"uri": str(dataset)}, output=str(tmp_path / "run"), epochs=2, cluster={"num_cpus": 3})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("point", ["ray-start-up", "training"])
def test_ctrl_c_during_train_leaves_nothing(tmp_path, ml100k_prepared, point):
    import threading

    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(_train_spec(tmp_path, ml100k_prepared))], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    if point == "ray-start-up":
        _wait_for(lambda: _ray_starting(proc.pid), proc=proc)
    else:
        _wait_for(lambda: any("[train] epoch" in l or "worker group" in l for l in lines), timeout=240, proc=proc)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    proc.wait(180)
    time.sleep(0.5)
    assert _leftovers(proc.pid) == []
    assert "Traceback" not in err, err[-3000:]
    if point == "ray-start-up":
        assert proc.returncode == 130, "".join(lines[-5:]) + err[-3000:]
        assert err.strip().splitlines()[-1] == "recmix: interrupted (Ctrl-C)"
    else:
        # Ray Train's fit() replaces the SIGINT handler with its own graceful abort, which ends the process
        # with exit 1 and no line; mapping that to 130 is the train driver's part (reported to its owner).
        assert proc.returncode != 0
