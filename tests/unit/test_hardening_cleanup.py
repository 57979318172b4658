"""Nothing leaks (issue 14, items 6 and 8) without a Ray cluster: shm buffers, stale temp dirs, start-up
interrupted, interrupted parquet writes, the exposure warning."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from recmix.actors import shm
from recmix.platform import cleanup, cluster, storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _spawn_using(path: str) -> subprocess.Popen:
    """A process whose command line names `path` (as Ray's processes name their temp dir), once exec'd."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--log-dir={path}/session_x/logs"])
    deadline = time.monotonic() + 10
    while p.pid not in cleanup.processes_using(path):  # Popen may return before the exec shows in /proc
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return p


# ---- /dev/shm buffers ------------------------------------------------------------------------------------------

needs_shm = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


@needs_shm
def test_buffer_is_owner_only_and_named_by_pid():
    b = shm.Buffer("t")
    b.ensure(100)
    try:
        assert stat.S_IMODE(os.stat(b.path).st_mode) == 0o600
        assert f"-p{os.getpid()}-" in os.path.basename(b.path)
    finally:
        b.close()


CHILD = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from recmix.actors import shm
    b = shm.Buffer("child")
    b.ensure(1 << 20)
    print(b.path, flush=True)
    time.sleep(60)
""")


@needs_shm
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_buffer_removed_after_signal_or_by_the_next_run(sig):
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = p.stdout.readline().strip()
    assert os.path.exists(path)
    p.send_signal(sig)  # Python's default SIGTERM ends the process without atexit, like SIGKILL
    p.wait(30)
    if sig == signal.SIGINT:
        assert not os.path.exists(path), "Ctrl-C left the buffer"
    else:
        assert os.path.exists(path)  # nothing runs in the killed process ...
        assert path in cleanup.sweep_stale()  # ... the next run removes it
        assert not os.path.exists(path)


@needs_shm
def test_sweep_keeps_live_buffers_and_other_names(tmp_path):
    b = shm.Buffer("live")
    b.ensure(10)
    other = os.path.join(cleanup.SHM_DIR, f"someone-else-p{_dead_pid()}-x")
    open(other, "wb").close()
    try:
        cleanup.sweep_stale()
        assert os.path.exists(b.path) and os.path.exists(other)
    finally:
        b.close()
        os.unlink(other)


# ---- stale temp dirs and start-up interrupted ------------------------------------------------------------------

def test_sweep_removes_dead_runs_temp_dir_and_its_processes():
    dead = _dead_pid()
    tmp = os.path.join(cleanup.TEMP_ROOT, f"{cleanup.TEMP_PREFIX}{dead}-testsweep")
    os.makedirs(os.path.join(tmp, "session_x"))
    # A process left running from the dead run's temp dir (as Ray's agents are when start-up is cut short).
    orphan = _spawn_using(tmp)
    live = os.path.join(cleanup.TEMP_ROOT, f"{cleanup.temp_prefix()}testlive")
    os.makedirs(live)
    try:
        assert tmp in cleanup.sweep_stale()
        assert not os.path.exists(tmp) and orphan.wait(10) is not None
        assert os.path.exists(live)  # this process is alive: its dir stays
    finally:
        orphan.kill()
        os.rmdir(live)


def test_interrupted_start_up_leaves_no_temp_dir_or_process(monkeypatch):
    """Ctrl-C inside `ray.init`, after Ray spawned a process in the temp dir but before `ray.init` returned."""
    import ray

    seen = {}

    def init_cut_short(**kw):
        tmp = kw["_temp_dir"]
        seen["tmp"] = tmp
        seen["proc"] = _spawn_using(tmp)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", init_cut_short)
    with pytest.raises(KeyboardInterrupt):
        cluster.connect(ClusterConfig(num_cpus=1), include_dashboard=False, echo=lambda s: None)
    try:
        assert seen["proc"].wait(10) is not None
        assert not os.path.exists(seen["tmp"])
        assert os.path.basename(seen["tmp"]).startswith(f"rmx-{os.getpid()}-")
        assert not cluster._TEMP_DIRS
    finally:
        seen["proc"].kill()


# ---- interrupted writes never leave a file a reader takes for data ---------------------------------------------

def test_interrupted_part_write_leaves_nothing(tmp_path, monkeypatch):
    from recmix.jobs.prepare import writer

    def half_written(table, where, filesystem=None, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.pq, "write_table", half_written)
    table = pa.table({"timestamp": pa.array([1], pa.int64()), "y": pa.array([1.0], pa.float32())})
    with pytest.raises(KeyboardInterrupt):
        writer.write_part(pafs.LocalFileSystem(), str(tmp_path), "v/train/part-00000.parquet", table, "y")
    assert [p.name for p in (tmp_path / "v" / "train").iterdir()] == []


def test_temp_names_are_hidden_from_dataset_discovery():
    name = storage.temp_name("bucket/ds/v1/train/part-00000.parquet")
    base = name.rsplit("/", 1)[1]
    assert base.startswith(".") and not base.endswith(".parquet")


# ---- exposure --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host,warns", [("0.0.0.0", True), ("10.1.2.3", True), ("::", True), ("127.0.0.1", False),
                                        ("localhost", False), ("::1", False)])
def test_non_loopback_dashboard_warns_with_address_and_auth(monkeypatch, host, warns):
    lines: list[str] = []
    monkeypatch.setattr(cluster, "_auth_mode", lambda: "disabled")
    cluster._warn_exposure(ClusterConfig(dashboard_host=host), lines.append)
    if not warns:
        assert lines == []
        return
    [line] = lines
    assert host in line and "authentication in force: NONE" in line
    monkeypatch.setattr(cluster, "_auth_mode", lambda: "token")
    lines.clear()
    cluster._warn_exposure(ClusterConfig(dashboard_host=host), lines.append)
    assert "authentication in force: Ray token authentication" in lines[0]


def test_connect_warns_for_a_spec_binding_the_dashboard_beyond_loopback(monkeypatch):
    import types

    import ray

    monkeypatch.setattr(ray, "init", lambda **kw: types.SimpleNamespace(dashboard_url=f"{kw['dashboard_host']}:8265"))
    lines: list[str] = []
    try:
        cluster.connect(ClusterConfig(dashboard_host="0.0.0.0", num_cpus=1), echo=lines.append)
    finally:
        cluster.shutdown()
    assert any("WARNING" in l and "0.0.0.0" in l and "authentication in force" in l for l in lines), lines
