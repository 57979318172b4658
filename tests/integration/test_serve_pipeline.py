"""The whole pipeline as one command: `recmix run examples/pipeline-ml100k.yaml` prepares ml-100k, trains
TokenMixer-Large with UG-Sep on Ray Train (1 epoch here), deploys it on Ray Serve, sends sample requests from
the test split over HTTP (served scores equal the offline scores of the same rows), prints the figures and
removes the application."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from recmix.jobs.cli import main
from recmix.platform.cluster import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_pipeline_example_trains_serves_and_checks_agreement(ray_cluster, ml100k_dir, tmp_path, monkeypatch, capsys):
    port = free_port()
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RECMIX_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("RECMIX_PIPELINE_EPOCHS", "1")
    monkeypatch.setenv("RECMIX_SERVE_PORT", str(port))
    assert main(["run", "examples/pipeline-ml100k.yaml", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert list(res) == ["prepare", "train", "serve"]
    sample = res["serve"]["sample"]
    assert sample["ok"] == sample["requests"] == 200 and sample["errors"] == 0, sample
    assert sample["max_abs_diff"] < 1e-5 and sample["agree"], sample
    assert sample["model_version"] == Path(res["serve"]["artifact"]).name
    assert res["train"]["test"]["auc"] > 0.55     # trained: one epoch on ml-100k gives about 0.7, chance 0.5
    summary = [ln for ln in out.splitlines() if ln.startswith("[pipeline] ")]
    assert any(ln.startswith("[pipeline] train: test AUC ") for ln in summary), summary
    assert any("[pipeline] serve: 200/200 sample requests x 50 candidates: p50 " in ln for ln in summary), summary
    assert "[serve] stopped" in out
    with pytest.raises(requests.ConnectionError):    # lifetime stop: nothing listens any more
        requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
