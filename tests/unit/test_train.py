"""Training loop: metrics, batching from parquet, early stopping and progress lines (Ray Train runs: tests/integration/test_train_ray.py)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from recmix.jobs.prepare.writer import new_version, publish, write_sorted_table
from recmix.jobs.train.data import to_arrays
from recmix.jobs.train.loop import make_optimizer, train_step
from recmix.jobs.train.metrics import auc, logloss, paired_bootstrap
from recmix.models.build import build_model
from recmix.models.toy import toy_batch, toy_schema
from recmix.platform.specs.job import JOB_ADAPTER
from recmix.platform.specs.prepare import SplitFractions
from recmix.platform.specs.model import ModelConfig


def test_auc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = rng.integers(0, 10, 300) / 10.0          # many ties
    pos, neg = p[y == 1], p[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(y, p) == pytest.approx(brute, abs=1e-12)
    assert np.isnan(auc(np.ones(5), np.arange(5)))
    assert logloss(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(-np.log(1e-7), rel=1e-6)


def test_paired_bootstrap_detects_a_better_model():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 100, 4000)
    y = rng.integers(0, 2, 4000).astype(float)
    good, bad = y + rng.normal(0, 0.8, 4000), y + rng.normal(0, 3.0, 4000)
    res = paired_bootstrap(y, good, bad, users, n=100)
    assert res["delta"] > 0 and res["lo95"] > 0 and res["p_le_0"] == 0.0


def test_paired_bootstrap_over_seeds_scores_the_mean_difference():
    rng = np.random.default_rng(2)
    users = rng.integers(0, 80, 3000)
    y = rng.integers(0, 2, 3000).astype(float)
    a = np.stack([y + rng.normal(0, s, 3000) for s in (1.0, 1.5, 2.0)])
    b = np.stack([y + rng.normal(0, s, 3000) for s in (1.2, 1.2, 1.2)])
    one = paired_bootstrap(y, a[0], b[0], users, n=60, seed=5)
    assert paired_bootstrap(y, a[:1], b[:1], users, n=60, seed=5) == one   # (1, N) is the single-seed case
    res = paired_bootstrap(y, a, b, users, n=60, seed=5)
    assert res["delta"] == pytest.approx(np.mean([auc(y, pa) - auc(y, pb) for pa, pb in zip(a, b)]), abs=1e-12)
    assert res["lo95"] <= res["delta"] <= res["hi95"] and res["delta"] != pytest.approx(one["delta"])
    # each seed's own interval comes from the same resamples: seed 0's equals the single-seed call's
    assert res["per_seed"][0] == [one["delta"], one["lo95"], one["hi95"]] and len(res["per_seed"]) == 3
    assert res["delta"] == pytest.approx(np.mean([x[0] for x in res["per_seed"]]), abs=1e-12)
    with pytest.raises(AssertionError):
        paired_bootstrap(y, a, b[:2], users)


def _raw_table(schema, n: int, seed: int) -> pa.Table:
    """Random rows for `schema` with a planted rule (label = item_id < 20 XOR hour < 4), time-sorted."""
    b = toy_batch(schema, n, seed)
    cols = {}
    for f in schema.inputs:
        x = b[f.name].numpy()
        if x.ndim == 2:
            cols[f.name] = pa.array([row[row >= 0].tolist() for row in x], type=pa.list_(pa.int64()))
        else:
            cols[f.name] = pa.array(x.astype(np.float32) if f.type.value == "dense" else x)
    label = ((b["item_id"].numpy() < 20) ^ (b["hour"].numpy() < 4)).astype(np.float32)
    cols["label"] = pa.array(label)
    cols["timestamp"] = pa.array(np.arange(n, dtype=np.int64))
    cols["user_key"] = pa.array(b["user_id"].numpy())
    return pa.table(cols)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    import pyarrow.fs as pafs

    root = str(tmp_path_factory.mktemp("ds") / "tiny")
    schema = toy_schema()
    version = new_version()
    fs = pafs.LocalFileSystem()
    stats = write_sorted_table(fs, root, version, _raw_table(schema, 3000, 0), SplitFractions(), "label", 1000)
    publish(fs, root, version, schema, stats, {"type": "test"})
    return root


def test_to_arrays_pads_lists_and_keeps_values(tiny_dataset):
    from recmix.platform.dataset import open_dataset

    ds = open_dataset(tiny_dataset)
    table = ds.read_split("valid")
    arr = to_arrays(table, ds.schema)
    hist = table.column("hist_items").to_pylist()
    for i in (0, 5, 17):
        row = arr.columns["hist_items"][i]
        assert row[row >= 0].tolist() == hist[i] and (row[len(hist[i]):] == -1).all()
    assert arr.labels.shape == (len(table), 1) and arr.user_key.dtype == np.int64
    batch = arr.batch(np.arange(8))
    assert batch["genres"].shape == (8, 4) and batch["labels"].dtype == torch.float32


def test_train_step_updates_and_reports():
    torch.set_num_threads(1)
    cfg = TypeAdapter(ModelConfig).validate_python(dict(arch="tokenmixer_large", d_model=16, n_heads=4, moe=dict(n_experts=4, n_active=2)))
    model = build_model(cfg, toy_schema())
    spec_opt = JOB_ADAPTER.validate_python(dict(kind="train", dataset=dict(uri="x"), model=cfg.model_dump(), output="o")).optimizer
    opt = make_optimizer(model, spec_opt)
    before = [p.detach().clone() for p in model.parameters()]
    parts = train_step(model, toy_batch(toy_schema(), 16), opt)
    assert {"loss", "bce", "aux_bce", "moe_max_over_mean_usage"} <= set(parts)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_train_spec_validation_names_the_problem():
    with pytest.raises(ValidationError, match="n_heads == n_tokens"):
        JOB_ADAPTER.validate_python(dict(kind="train", dataset=dict(uri="x"), output="o",
                                         model=dict(arch="rankmixer", n_tokens=4, n_heads=2, d_model=16)))
    with pytest.raises(ValidationError, match="unsupported URI scheme"):
        JOB_ADAPTER.validate_python(dict(kind="train", dataset=dict(uri="x"), output="gs://b/o", model=dict(arch="dlrm_mlp")))


def _scripted_fit(monkeypatch, valid_aucs, patience, progress_s=10.0, n_rows=40, ctx=None):
    """`fit` with train_step and evaluate replaced: epoch e scores valid_aucs[e - 1] on the valid split."""
    from recmix.jobs.train import loop
    from recmix.jobs.train.data import SplitArrays

    def split(n):
        return SplitArrays({"x": np.zeros(n, np.int64)}, np.zeros((n, 1), np.float32), np.arange(n, dtype=np.int64))

    train, valid, test = split(n_rows), split(10), split(10)
    aucs = iter(valid_aucs)

    def evaluate(model, data, batch_size, ctx, warm_users=None, sparse=None):
        a = next(aucs, 0.5) if data is valid else 0.5
        return {"rows": len(data), "auc": a, "logloss": 0.7}, np.zeros((len(data), 1))

    monkeypatch.setattr(loop, "train_step", lambda model, batch, opt: {"loss": 0.25})
    monkeypatch.setattr(loop, "evaluate", evaluate)
    logs = []
    feed = loop.ArrayFeed(train, valid, test, batch_size=4, seed=0)
    res = loop.fit(torch.nn.Linear(1, 1), None, feed, ctx or loop.LocalContext(logs.append), eval_batch_size=4,
                   epochs=len(valid_aucs), patience=patience, progress_s=progress_s)
    return res, logs


@pytest.mark.parametrize("patience, epochs_run", [(0, 3), (1, 3), (2, 4), (3, 5)])
def test_early_stopping_stops_after_patience_epochs_without_gain(monkeypatch, patience, epochs_run):
    # best at epoch 2, then no gain: stop after `patience` further epochs (patience 0: at the first one)
    res, _ = _scripted_fit(monkeypatch, [0.6, 0.7, 0.65, 0.69, 0.68, 0.5, 0.5, 0.5], patience)
    assert res.best_epoch == 2 and res.epochs_run == epochs_run
    assert len(res.history) == res.epochs_run and [h["valid_auc"] for h in res.history][:2] == [0.6, 0.7]


def test_linear_schedule_sets_each_steps_lr_from_the_runs_first_step(monkeypatch):
    from types import SimpleNamespace

    from recmix.jobs.train import loop
    from recmix.jobs.train.data import SplitArrays
    from recmix.platform.specs.train import OptimizerConfig

    assert loop.lr_schedule(OptimizerConfig(lr=0.1), 100) is None
    sched = loop.lr_schedule(OptimizerConfig(lr=0.1, schedule="linear"), 100)
    assert [sched(s) for s in (0, 50, 100, 130)] == [0.1, 0.05, 0.0, 0.0]
    seen = []
    opt = SimpleNamespace(param_groups=[{"lr": 1.0}, {"lr": 1.0}])
    monkeypatch.setattr(loop, "train_step", lambda model, batch, o: seen.append([g["lr"] for g in o.param_groups]) or {"loss": 0.0})
    monkeypatch.setattr(loop, "evaluate", lambda model, data, *a, **k: ({"rows": len(data), "auc": 0.6, "logloss": 0.7},
                                                                         np.zeros((len(data), 1))))

    def split(n):
        return SplitArrays({"x": np.zeros(n, np.int64)}, np.zeros((n, 1), np.float32), np.arange(n, dtype=np.int64))

    feed = loop.ArrayFeed(split(8), split(4), split(4), batch_size=4, seed=0)   # 2 steps per epoch
    loop.fit(torch.nn.Linear(1, 1), opt, feed, loop.LocalContext(lambda s: None), eval_batch_size=4, epochs=2, patience=5,
             schedule=loop.lr_schedule(OptimizerConfig(lr=0.1, schedule="linear"), 2 * feed.steps_per_epoch))
    assert seen == [[pytest.approx(v)] * 2 for v in (0.1, 0.075, 0.05, 0.025)]


def test_progress_lines_within_an_epoch(monkeypatch):
    _, quiet = _scripted_fit(monkeypatch, [0.6], patience=1)
    within = re.compile(r" step \d+/")
    assert not any(within.search(line) for line in quiet)
    _, logs = _scripted_fit(monkeypatch, [0.6], patience=1, progress_s=0.0)
    steps = [line for line in logs if within.search(line)]
    assert len(steps) == 9                   # 10 steps of 4 rows; none after the last step (the epoch line follows)
    assert steps[0].startswith("[train] epoch 1 step 1/10:") and "samples/s" in steps[0] and "loss 0.2500" in steps[0]


def test_fit_hands_its_figures_to_the_context_and_the_gauges_keep_them(monkeypatch):
    """Rank 0's figures reach `observe` from the first step of every epoch; the driver's gauges set them again on
    every refresh (Ray's agent drops a gauge series not set within 20 s)."""
    from recmix.jobs.train import loop
    from recmix.jobs.train.progress import FIGURES, TrainGauges

    class Observed(loop.LocalContext):
        figures: list = []

        def observe(self, figures):
            self.figures.append(figures)

    ctx = Observed(lambda line: None)
    _scripted_fit(monkeypatch, [0.6, 0.7], patience=5, ctx=ctx)
    firsts = [f for f in ctx.figures if f["step"] in (1, 11)]
    assert [f["epoch"] for f in firsts] == [1, 2] and all(f["loss"] == 0.25 and f["samples_per_s"] > 0 for f in firsts)

    sets: list = []

    class FakeGauge:
        def __init__(self, name, tags):
            self.name, self.tags = name, tags

        def set(self, v):
            sets.append((self.name, v))

    gauges = TrainGauges("run-a", make=lambda name, **tags: FakeGauge(name, tags))
    assert {g.tags["group"] for g in gauges._gauges.values()} == {"run-a"} and len(gauges._gauges) == len(FIGURES)
    gauges.set({"step": 3, "loss": 0.5, "rows": 7, "note": "x"})   # unregistered keys are ignored
    gauges.refresh()
    assert sets == [("recmix_train_step", 3.0), ("recmix_train_loss", 0.5)] * 2


def test_metrics_json_keeps_secret_interpolations_out(tmp_path, monkeypatch):
    """A spec value that came from a secret-named variable (`${..._TOKEN}`) is not copied into metrics.json."""
    from types import SimpleNamespace

    from recmix.jobs.train import _write_outputs
    from recmix.platform.specs.load import load_spec

    secret = "s3cr3t-Value-4-test"
    monkeypatch.setenv("RECMIX_TEST_OUTPUT_TOKEN", secret)
    spec_file = tmp_path / "train.yaml"
    spec_file.write_text(f"kind: train\ndataset: {{uri: {tmp_path}/data}}\nmodel: {{arch: dlrm_mlp}}\n"
                         f"output: {tmp_path}/out-${{RECMIX_TEST_OUTPUT_TOKEN}}\n")
    spec = load_spec(spec_file)
    assert secret in spec.output  # the run itself gets the value
    res = SimpleNamespace(best_state={}, metrics=lambda: {"test_auc": 0.5}, history=[], best_epoch=1, epochs_run=1,
                          steps=1, resumed_from_step=0, world_size=1, wall_s=0.0, train_samples_per_s=0.0, valid={},
                          test={}, artifact=None, test_probs=np.zeros((3, 1)))
    _write_outputs(spec, res, print)
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / f"out-{secret}").glob("*.json"))
    assert "test_auc" in written and "${RECMIX_TEST_OUTPUT_TOKEN}" in written and secret not in written


def test_a_backtest_quality_run_never_reads_the_test_split(tiny_dataset, monkeypatch):
    from recmix.jobs.bench import quality
    from recmix.platform.dataset import PreparedDataset as Dataset
    from recmix.platform.specs.bench import QualityParams

    read, real = [], Dataset.read_split

    def recording(self, split, columns=None):
        read.append(split)
        return real(self, split, columns)

    monkeypatch.setattr(Dataset, "read_split", recording)
    params = QualityParams(dataset=tiny_dataset, holdout="backtest")
    out = quality._one(("dlrm_mlp", quality.MODELS["dlrm_mlp"], 0, True, tiny_dataset, params))
    assert sorted(read) == ["train", "valid"] and 0.0 <= out["test"]["auc"] <= 1.0
