"""`kind: train` on Ray Train: DDP workers fed by Ray Data, checkpoints, resume after a worker or driver kill,
the artifact round trip, S3, and the checks made before any work."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from recmix.jobs.cli import main
from recmix.platform.specs.job import JOB_ADAPTER

from tests.unit.test_train import tiny_dataset  # noqa: F401  (module fixture: a prepared tiny dataset)

MODEL = dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_heads=4, n_layers=2,
             moe=dict(n_experts=4, n_active=2))


def spec_dict(uri, out, **kw) -> dict:
    return {**dict(kind="train", dataset=dict(uri=str(uri)), output=str(out), epochs=2, batch_size=64, seed=0,
                   threads=1, optimizer=dict(name="adamw", lr=0.01), early_stopping=dict(patience=1), model=MODEL), **kw}


def write_spec(tmp_path, d: dict, name="train.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


# The 2-worker run every worker-failure comparison is made against: same model, seed and checkpoints.
TWO_WORKERS = dict(scaling=dict(workers=2), checkpoint=dict(every_steps=10, keep=2), failure=dict(max_failures=1))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_dataset, tmp_path_factory):  # noqa: F811
    """`recmix run SPEC --json` of a 2-worker spec with relative paths (the workers run in another working
    directory); returns (run folder, spec path, printed lines)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("uninterrupted")
    path = write_spec(root, spec_dict(os.path.relpath(tiny_dataset, root), "run", **TWO_WORKERS))
    buf, cwd = io.StringIO(), os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["run", str(path), "--json"])
    finally:
        os.chdir(cwd)
    assert rc == 0, buf.getvalue()[-3000:]
    return root / "run", path, buf.getvalue().strip().splitlines()


def assert_same_predictions(artifact_uri: str, dataset_uri: str, run_out) -> None:
    """The loaded artifact predicts every test row as the run did (test_predictions.npy): max abs diff <= 1e-5."""
    from recmix.jobs.train import PREDICTIONS
    from recmix.jobs.train.data import to_arrays
    from recmix.jobs.train.loop import predict
    from recmix.models.artifact import load_artifact
    from recmix.platform.dataset import open_dataset

    ds = open_dataset(dataset_uri)
    p = predict(load_artifact(artifact_uri), to_arrays(ds.read_split("test"), ds.schema), 4096)
    want = np.load(run_out / PREDICTIONS)
    assert p.shape == want.shape == (ds.rows("test"), 1), (p.shape, want.shape)
    assert np.abs(p - want).max() <= 1e-5, np.abs(p - want).max()
    assert want.std() > 1e-3   # the rows differ: a wrong row order would show


@pytest.mark.slow
def test_two_workers_train_publish_and_round_trip(uninterrupted, tiny_dataset, capsys):  # noqa: F811
    from recmix.jobs.train.score import score
    from recmix.models.artifact import load_artifact

    out, path, lines = uninterrupted
    summary = json.loads(lines[-1])
    assert summary["world_size"] == 2 and summary["resumed_from_step"] == 0
    assert any(re.match(r"\[train\] epoch 1: step \d+ .*valid auc", ln) for ln in lines), lines
    assert lines[-2].startswith("[train] test AUC ")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["auc"] > 0.6 and metrics["test"]["rows"] == 300 and {"auc_warm", "auc_cold"} <= set(metrics["test"])
    report = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == list(range(1, metrics["epochs_run"] + 1))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # pixels: tests/unit/test_train_curves.py
    # checkpoints: the newest `keep` under the run folder, each complete
    cks = sorted(p.name for p in (out / "checkpoints" / "train").glob("checkpoint-*"))
    assert len(cks) == 2 and cks[-1].endswith("-1"), cks
    import torch

    for name in ("model.pt", "best.pt", "optimizer.pt", "rng.pt"):
        torch.load(out / "checkpoints" / "train" / cks[-1] / name, weights_only=True)
    # the artifact reproduces the run's test AUC and every row's prediction
    latest = (out / "artifact" / "LATEST").read_text().strip()
    model = load_artifact(str(out / "artifact"))
    assert model.artifact["version"] == latest and model.artifact["format"] == "recmix-model-artifact-v1"
    assert {"torch", "ray", "recmix"} <= set(model.artifact["packages"])
    res = score(str(out / "artifact"), str(tiny_dataset), echo=lambda s: None)
    assert abs(res["auc"] - metrics["test"]["auc"]) < 1e-6 and abs(res["logloss"] - metrics["test"]["logloss"]) < 1e-6
    assert_same_predictions(str(out / "artifact"), str(tiny_dataset), out)
    assert main(["score", str(out / "artifact"), str(tiny_dataset)]) == 0
    assert capsys.readouterr().out.startswith("test: auc ")
    # a rerun of the completed run is refused before any work, in one line; --restart trains afresh
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        assert main(["run", str(path)]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already completed" in err and "--restart" in err, err
    assert time.perf_counter() - t0 < 5


@pytest.mark.slow
def test_init_from_an_artifact_starts_where_that_run_ended(uninterrupted, tiny_dataset, tmp_path, capsys):  # noqa: F811
    from recmix.jobs.train import PREDICTIONS

    out, _, _ = uninterrupted
    src = str(out / "artifact")
    # lr 1e-9: one epoch cannot move the weights, so the run scores as the artifact it started from
    d = spec_dict(tiny_dataset, tmp_path / "warm", epochs=1, init_from=src, optimizer=dict(name="adamw", lr=1e-9))
    assert main(["run", str(write_spec(tmp_path, d))]) == 0
    assert f"[train] initial weights from {src}" in capsys.readouterr().out
    want, got = np.load(out / PREDICTIONS), np.load(tmp_path / "warm" / PREDICTIONS)
    assert np.abs(got - want).max() < 1e-4 and want.std() > 1e-3
    # a source that does not fit the model is named by the worker: one line, exit 2
    d = spec_dict(tiny_dataset, tmp_path / "wide", epochs=1, init_from=src, model={**MODEL, "d_model": 32},
                  failure=dict(max_failures=0))
    assert main(["run", str(write_spec(tmp_path, d, "wide.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"init_from: {src}: the source weights do not fit" in err, err
    # a missing source: one line before Ray Train starts
    d = spec_dict(tiny_dataset, tmp_path / "none", init_from=str(tmp_path / "nowhere"))
    assert main(["run", str(write_spec(tmp_path, d, "none.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a model artifact" in err and not (tmp_path / "none").exists(), err


def test_more_workers_than_the_cluster_places_fails_before_training(ray_cluster, tiny_dataset, tmp_path, capsys):  # noqa: F811
    path = write_spec(tmp_path, spec_dict(tiny_dataset, tmp_path / "run", scaling=dict(workers=8)))
    t0 = time.perf_counter()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "scaling: 8 workers x 1 CPU need 8 CPUs plus 1 for Ray Data; the cluster has 4" in err, err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run" / "checkpoints").exists()


def _pids(lines: list[str]) -> list[int]:
    for ln in lines:
        m = re.match(r"\[train\] worker group: \d+ rank\(s\), pids ([\d ]+),", ln)
        if m:
            return [int(x) for x in m.group(1).split()]
    return []


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_from_the_latest_checkpoint(uninterrupted, tiny_dataset, tmp_path):  # noqa: F811
    from recmix.jobs.train import run

    out = tmp_path / "run"
    spec = JOB_ADAPTER.validate_python(spec_dict(tiny_dataset, out, **TWO_WORKERS))
    lines: list[str] = []
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        snap = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
        while time.time() < deadline and not killed:
            # registered by Ray Train (a folder alone may still be uploading)
            done = snap.exists() and "checkpoint-" in snap.read_text()
            pids = _pids(lines)
            if done and pids:
                os.kill(pids[1], signal.SIGKILL)
                killed.append(pids[1])
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run(spec, log=lines.append)
    t.join(5)
    assert killed, lines
    assert summary["resumed_from_step"] > 0, "\n".join(lines + [str(killed)])
    assert any(ln.startswith("[train] resuming from step ") for ln in lines), lines
    # as good as the uninterrupted run of the same spec (batch order differs: Ray Data's shuffle is unseeded)
    base = json.loads(uninterrupted[2][-1])["test"]["auc"]
    assert abs(summary["test"]["auc"] - base) <= 0.01, (summary["test"]["auc"], base)


@pytest.mark.slow
def test_driver_killed_then_rerun_continues_from_the_checkpoint(tiny_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    path = write_spec(tmp_path, spec_dict(tiny_dataset, out, epochs=2, scaling=dict(workers=1), checkpoint=dict(every_steps=10),
                                          cluster=dict(num_cpus=3)))
    exe = os.path.join(os.path.dirname(sys.executable), "recmix")
    # its own session: the driver's local cluster dies with it, as when a terminal or machine goes
    proc = subprocess.Popen([exe, "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        snap = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
        while time.time() < deadline:
            if snap.exists() and "checkpoint-" in snap.read_text():
                break
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    # The killed run's Ray Train controller and worker outlive the driver by a few seconds (their own process
    # groups) and may register one more checkpoint: the rerun's recheck covers that (unit-tested in
    # test_train_state.py); here the rerun starts once the run folder is quiet, so the step is exact.
    snap = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    last, quiet_since, deadline = snap.read_text(), time.time(), time.time() + 60
    while time.time() - quiet_since < 8 and time.time() < deadline:
        time.sleep(0.5)
        if snap.read_text() != last:
            last, quiet_since = snap.read_text(), time.time()
    seen = int(json.loads(last)["latest_checkpoint_result"]["checkpoint_dir_name"].split("-")[1])
    # (a node that misses Ray's 30 s startup window on a loaded machine is started once more by cluster.connect)
    again = subprocess.run([exe, "run", str(path), "--json"], capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    said = re.findall(r"resuming run 'train' from checkpoint-(\d{9})-[01] \(step (\d+)\)", again.stdout)
    assert said and int(said[-1][0]) == int(said[-1][1]) == seen > 0, again.stdout
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == seen, (summary["resumed_from_step"], said)


def test_truncated_checkpoint_is_refused_with_one_line(tiny_dataset, tmp_path, capsys):  # noqa: F811
    """No Ray: the check runs before the cluster starts."""
    ck = tmp_path / "run" / "checkpoints" / "train" / "checkpoint-000000010-0"
    ck.mkdir(parents=True)
    from recmix.jobs.train import state

    (ck / "model.pt").write_bytes(b"x" * 10)
    (ck / "trainer.json").write_text(json.dumps({"format": state.FORMAT, "state": {"step": 10},
                                                 "files": {"model.pt": {"bytes": 20, "sha256": "0"}}}))
    path = write_spec(tmp_path, spec_dict(tiny_dataset, tmp_path / "run"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint_manager_snapshot.json (partial)" in err, err
    (ck.parent / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": ck.name}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is corrupt (model.pt" in err and "--restart" in err, err
    (ck / "trainer.json").write_text('{"format": "recmix-tr')
    assert main(["run", str(path)]) == 2
    assert "not valid JSON (truncated?)" in capsys.readouterr().err


def test_missing_dataset_is_exit_2(tmp_path, capsys):
    path = write_spec(tmp_path, spec_dict(tmp_path / "nothing", tmp_path / "run"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a prepared dataset" in err, err


@pytest.fixture(scope="module")
def ml100k_prepared(tmp_path_factory, ml100k_dir):
    from recmix.jobs.prepare import run as prepare
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.prepare import PrepareSpec

    uri = str(tmp_path_factory.mktemp("ml100k") / "ds")
    prepare(PrepareSpec(kind="prepare", source=dict(type="movielens100k", path=str(ml100k_dir)), output=dict(uri=uri)),
            ClusterConfig())
    return uri


@pytest.mark.slow
def test_two_workers_match_one_worker_on_ml100k(ray_cluster, ml100k_prepared, tmp_path):
    """Same model, seed, global batch and samples (2 epochs of the 80k training rows): test AUC within 0.01."""
    from recmix.jobs.train import run

    model = dict(arch="tokenmixer_large", tokenizer="group_mlp", d_model=16, n_heads=4, n_layers=2, ffn_mult=2.0)
    aucs = {}
    for workers in (1, 2):
        spec = JOB_ADAPTER.validate_python(spec_dict(ml100k_prepared, tmp_path / f"w{workers}", epochs=2, batch_size=512,
                                                     model=model, optimizer=dict(name="adamw", lr=0.003),
                                                     scaling=dict(workers=workers)))
        summary = run(spec, log=lambda s: None)
        assert summary["world_size"] == workers and summary["test"]["rows"] == 10_000
        aucs[workers] = summary["test"]["auc"]
    assert aucs[1] > 0.7 and abs(aucs[1] - aucs[2]) < 0.01, aucs


@pytest.mark.slow
def test_s3_dataset_checkpoints_and_artifact(ray_cluster, tiny_dataset, s3_server, s3_bucket, tmp_path):  # noqa: F811
    import pyarrow.fs as pafs

    from recmix.jobs.train import run
    from recmix.jobs.train.score import score
    from recmix.models.artifact import load_artifact
    from recmix.platform.specs.data import StorageConfig

    s3 = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing")
    pafs.copy_files(str(tiny_dataset), f"{s3_bucket}/ds", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    storage = {"endpoint_url": s3_server}
    out = f"s3://{s3_bucket}/runs/tiny"
    spec = JOB_ADAPTER.validate_python(spec_dict(f"s3://{s3_bucket}/ds", out, epochs=1, storage=storage,
                                                 scaling=dict(workers=2)))
    summary = run(spec, log=lambda s: None)
    names = {i.base_name for i in s3.get_file_info(pafs.FileSelector(f"{s3_bucket}/runs/tiny/checkpoints/train"))}
    assert any(n.startswith("checkpoint-") for n in names), names
    cfg = StorageConfig(**storage)
    model = load_artifact(f"{out}/artifact", cfg)
    assert model.artifact["metrics"]["test"]["auc"] == summary["test"]["auc"]
    res = score(f"{out}/artifact", f"s3://{s3_bucket}/ds", storage_cfg=cfg, echo=lambda s: None)
    assert abs(res["auc"] - summary["test"]["auc"]) < 1e-6


def test_restart_clears_the_run_and_its_lmdb_before_any_work(tiny_dataset, tmp_path):  # noqa: F811
    """No Ray: --restart removes the run folder (checkpoints, completion marker) and the PS LMDB folder; without it,
    a used LMDB folder and no checkpoint is refused (never a silent warm start)."""
    from recmix.jobs.train import COMPLETE, preflight
    from recmix.platform.errors import RecmixError

    run = tmp_path / "run" / "checkpoints" / "train"
    (run / "checkpoint-000000005-1").mkdir(parents=True)
    (run / COMPLETE).write_text(json.dumps({"artifact": "v1", "test_auc": 0.7}))
    lmdb = tmp_path / "lmdb"
    (lmdb / "shard-0").mkdir(parents=True)
    emb = dict(name="rs", shards=1, lmdb_path=str(lmdb))
    spec = JOB_ADAPTER.validate_python(spec_dict(tiny_dataset, tmp_path / "run", embedding=emb))
    with pytest.raises(RecmixError, match="already completed"):
        preflight(spec, False, lambda s: None)
    (run / COMPLETE).unlink()
    shutil.rmtree(run / "checkpoint-000000005-1")
    with pytest.raises(RecmixError, match="embedding.lmdb_path: .* holds the rows of an earlier run"):
        preflight(spec, False, lambda s: None)
    (run / COMPLETE).write_text("{}")
    assert preflight(spec, True, lambda s: None) is None
    assert not run.exists() and not lmdb.exists()
