"""Platform layer: the routing hash contract, the Ray helper, and the bench output convention."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from recmix.platform import bench, hashing


def test_mix64_matches_reference_splitmix64():
    # Reference: the splitmix64 finalizer written out with Python integers.
    def ref(x: int) -> int:
        m = (1 << 64) - 1
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & m
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    xs = [0, 1, 2, 12345, (1 << 63) + 7, (1 << 64) - 1]
    got = hashing.mix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [ref(x) for x in xs]


def test_mix64_does_not_modify_input_and_accepts_int64():
    ids = np.array([-1, 5, 7], dtype=np.int64)
    before = ids.copy()
    out = hashing.mix64(ids)
    assert np.array_equal(ids, before)
    assert out.dtype == np.uint64 and out[0] == hashing.mix64(np.array([(1 << 64) - 1], dtype=np.uint64))[0]


def test_shard_routing_is_deterministic_balanced_and_table_dependent():
    ids = np.arange(200_000, dtype=np.int64)
    s4 = hashing.shard_of("item", ids, 4)
    assert np.array_equal(s4, hashing.shard_of("item", ids, 4))
    counts = np.bincount(s4, minlength=4)
    assert counts.min() > 0.97 * len(ids) / 4
    # Another table sends the same ids elsewhere (tables are independent key spaces).
    assert (hashing.shard_of("user", ids, 4) != s4).mean() > 0.7
    with pytest.raises(ValueError, match="n_shards must be positive"):
        hashing.shard_of("item", ids, 0)


def test_bucket_and_string_id_ranges():
    b = hashing.bucket(np.arange(10_000), 97)
    assert b.min() >= 0 and b.max() < 97 and len(np.unique(b)) == 97
    sid = hashing.string_id(["T8H", "021", "T8H"])
    assert sid[0] == sid[2] and sid[0] != sid[1] and (sid >= 0).all()


def test_bench_prints_table_then_json_last_line(capsys, tmp_path):
    from tests.bench_fixture import run

    out = tmp_path / "b.txt"
    payload = bench.emit("_unit", True, lambda: run(True), params={"k": 1}, out=str(out))
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last == json.loads(json.dumps(payload))
    assert last["results"]["ratio"] == pytest.approx(0.5) and last["quick"] is True and last["params"] == {"k": 1}
    assert {"cores", "torch", "ray", "device"} <= set(last["machine"])
    assert "fixture bench" in lines[0]
    assert out.read_text().strip().splitlines()[-1] == lines[-1]


def test_unknown_bench_is_a_user_error():
    from recmix.jobs.bench import bench as lookup
    from recmix.platform.errors import RecmixError

    with pytest.raises(RecmixError, match="unknown benchmark 'nope'"):
        lookup("nope")


def test_session_cluster_has_the_configured_cpus(ray_cluster):
    import ray

    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 4


DASHBOARD_PROBE = """
import json, socket, urllib.error, urllib.request
from recmix.platform import cluster
from recmix.platform.specs.cluster import ClusterConfig


def listen_ips(port):
    # the kernel's socket table: local addresses in LISTEN state (0A) on `port`
    ips = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                ip_hex, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:
                    ips.add(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]) if len(ip_hex) == 8 else "ipv6:" + ip_hex)
    return sorted(ips)


lines = []
with cluster.cluster(ClusterConfig(num_cpus=1), echo=lines.append) as ctx:
    url = cluster.dashboard_url()
    port = int(url.rsplit(":", 1)[1])
    listen = listen_ips(port)
    try:
        status = urllib.request.urlopen(url + "/api/version", timeout=10).status
    except urllib.error.HTTPError as e:
        status = e.code  # 401 under token authentication: still the running dashboard answering
    print(json.dumps({"ctx_url": ctx.dashboard_url, "url": url, "listen": listen, "status": status, "lines": lines}))
"""


@pytest.mark.slow
def test_local_cluster_dashboard_listens_on_loopback_only():
    """The RUNNING dashboard of a cluster `connect` starts: its reported URL, the socket it listens on, an answer."""
    import subprocess
    import sys

    # its own process: the session cluster of this test run has no dashboard, and one process holds one cluster
    proc = subprocess.run([sys.executable, "-c", DASHBOARD_PROBE], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["url"].startswith("http://127.0.0.1:") and got["url"] == f"http://{got['ctx_url']}"
    assert got["listen"] == ["127.0.0.1"]  # bound to loopback only, not 0.0.0.0
    assert got["status"] in (200, 401)
    assert got["lines"] == [f"[ray] started a local cluster; dashboard {got['url']}"]


def test_local_cluster_without_dashboard_says_so(monkeypatch):
    """The announce line when include_dashboard is off (ray.init stubbed: no second cluster in this process)."""
    import ray

    from recmix.platform import cluster

    class Ctx:
        dashboard_url = ""

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: Ctx())
    monkeypatch.setattr(cluster, "_TEMP_DIRS", [])
    lines = []
    cluster.connect(include_dashboard=False, echo=lines.append)
    assert lines == ["[ray] started a local cluster; no dashboard (include_dashboard is off)"]
    for d in cluster._TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def test_join_failure_names_what_to_set(monkeypatch):
    """A cluster that answers but refuses the client reads as token authentication; a closed port as unreachable."""
    import socket

    import ray

    from recmix.platform import cluster
    from recmix.platform.errors import RecmixError
    from recmix.platform.specs.cluster import ClusterConfig

    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refuse(**kw):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kw['address']}")

    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with pytest.raises(RecmixError, match=r"rejected this client.*export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"):
            cluster.connect(ClusterConfig(address=f"127.0.0.1:{port}"))
    with pytest.raises(RecmixError, match=f"127.0.0.1:{port}: nothing accepts connections there"):
        cluster.connect(ClusterConfig(address=f"127.0.0.1:{port}"))
