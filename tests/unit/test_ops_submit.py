"""`recmix submit` / `recmix jobs` without a cluster: what is submitted, exit codes, address and token rules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import recmix
from recmix.jobs import submit
from recmix.jobs.cli import main

SPEC = "kind: prepare\nsource: {type: synthetic, n_rows: 1000, n_users: 10, n_items: 10, history_len: 2}\noutput: {uri: /tmp/x}\n"


class FakeClient:
    def __init__(self, status="SUCCEEDED"):
        self.status, self.submitted, self.stopped = status, {}, []

    def submit_job(self, **kw):
        self.submitted = kw
        self.staged = sorted(p.name for p in Path(kw["runtime_env"]["working_dir"]).iterdir())
        return "raysubmit_1"

    async def tail_job_logs(self, sid):
        yield "[prepare] done\n"

    def get_job_info(self, sid):
        return SimpleNamespace(status=SimpleNamespace(value=self.status), message="Job entrypoint command failed with exit code 2")

    def stop_job(self, sid):
        self.stopped.append(sid)
        return True


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "prep.yaml"
    p.write_text(SPEC)
    return p


@pytest.mark.parametrize("status,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 130)])
def test_exit_code_follows_the_final_status(monkeypatch, spec, capsys, status, code):
    fake = FakeClient(status)
    monkeypatch.setattr(submit, "client", lambda address: fake)
    assert main(["submit", str(spec)]) == code
    out = capsys.readouterr().out
    assert "[prepare] done" in out and f"raysubmit_1 {status}" in out


def test_what_is_submitted(monkeypatch, spec):
    fake = FakeClient()
    monkeypatch.setattr(submit, "client", lambda address: fake)
    assert main(["submit", str(spec), "--no-wait"]) == 0
    kw = fake.submitted
    assert kw["entrypoint"] == "python -m recmix.jobs.cli run prep.yaml"
    assert kw["entrypoint_num_cpus"] == 0
    assert kw["runtime_env"]["py_modules"] == [str(Path(recmix.__file__).parent)]
    assert fake.staged == ["prep.yaml"]  # the working dir holds the spec only
    assert kw["metadata"]["kind"] == "prepare"
    assert not any("TOKEN" in k or "SECRET" in k for k in kw["runtime_env"].get("env_vars", {}))


def test_a_bad_spec_never_reaches_the_cluster(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(submit, "client", lambda address: pytest.fail("contacted the cluster"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: prepare\nsource: {type: synthetic, n_rowz: 5}\n")
    assert main(["submit", str(bad)]) == 2
    assert "n_rowz" in capsys.readouterr().err


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert submit.resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example:443")
    assert submit.resolve_address(None) == "https://ray.example:443"
    assert submit.resolve_address("http://h:1") == "http://h:1"


def test_token_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert submit.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert submit.auth_headers() == {"Authorization": "Bearer home"}
    (tmp_path / "tok").write_text("path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.auth_headers() == {"Authorization": "Bearer path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert submit.auth_headers() == {"Authorization": "Bearer env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_jobs_stop(monkeypatch, capsys):
    fake = FakeClient()
    monkeypatch.setattr(submit, "client", lambda address: fake)
    assert main(["jobs", "stop", "raysubmit_1"]) == 0
    assert fake.stopped == ["raysubmit_1"] and "stop requested" in capsys.readouterr().out


def test_inside_a_ray_job_local_joins_the_jobs_cluster(monkeypatch):
    """`address: local` with RAY_ADDRESS set (a job's driver) joins it, in namespace recmix; ray.init is stubbed."""
    import ray

    from recmix.platform import cluster
    from recmix.platform.specs.cluster import ClusterConfig

    calls = []

    class Ctx:
        dashboard_url = ""

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or Ctx())
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    lines = []
    cluster.connect(ClusterConfig(), echo=lines.append)
    assert calls[-1]["address"] == "10.1.2.3:6379" and calls[-1]["namespace"] == "recmix"
    assert calls[-1]["log_to_driver"] is True  # worker output reaches the job's logs
    assert lines == ["[ray] joined the cluster at 10.1.2.3:6379 (RAY_ADDRESS); no dashboard (the cluster runs without one)"]
    cluster.connect(ClusterConfig(address="auto"), echo=lines.append)  # an explicit address still wins
    assert calls[-1]["address"] == "auto"
