"""A local node that misses Ray's fixed 30 s startup window is started once more, then ends as one line.
`ray.init` is replaced here (the unit tier runs no Ray): the real timeout needs an overloaded machine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from recmix.platform import cluster
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet failed "
                    "to startup or the GCS has become overloaded.")


def _fake_init(monkeypatch, outcomes: list):
    calls = []

    def init(**kw):
        calls.append(kw["_temp_dir"])
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_a_missed_startup_window_is_retried_once_in_a_fresh_temp_dir(monkeypatch):
    said = []
    calls = _fake_init(monkeypatch, [TIMEOUT, SimpleNamespace(dashboard_url=None)])
    cluster.connect(ClusterConfig(), include_dashboard=False, echo=said.append)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert any("startup window" in s for s in said) and "started a local cluster" in said[-1]
    cluster.shutdown()   # removes the temp dir (the fake init started no processes)
    assert not cluster._TEMP_DIRS


def test_a_second_miss_is_one_line_and_other_errors_pass_through(monkeypatch):
    _fake_init(monkeypatch, [TIMEOUT, TIMEOUT])
    with pytest.raises(RecmixError, match="missed Ray's 30 s startup window twice"):
        cluster.connect(ClusterConfig(), include_dashboard=False, echo=lambda s: None)
    assert not cluster._TEMP_DIRS   # both attempts' temp dirs removed
    _fake_init(monkeypatch, [RuntimeError("something else")])
    with pytest.raises(RuntimeError, match="something else"):
        cluster.connect(ClusterConfig(), include_dashboard=False, echo=lambda s: None)
