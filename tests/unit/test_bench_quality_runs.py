"""The quality bench keeps each dataset's runs in their own folder (a bench on another dataset overwrote them)."""

from __future__ import annotations

from recmix.jobs.bench.quality import MODELS, run_folder, spec_for
from recmix.platform.specs.bench import QualityParams


def test_runs_of_different_datasets_do_not_share_folders():
    params = QualityParams()
    out = {uri: spec_for("rankmixer", MODELS["rankmixer"], 1, False, uri, params).output
           for uri in ("./artifacts/ml100k", "/data/synthetic-cross/", "s3://bucket/x/ml100k-v2")}
    assert out["./artifacts/ml100k"] == "./artifacts/runs/quality/ml100k/rankmixer-s1"
    assert out["/data/synthetic-cross/"] == "./artifacts/runs/quality/synthetic-cross/rankmixer-s1"
    assert out["s3://bucket/x/ml100k-v2"] == "./artifacts/runs/quality/ml100k-v2/rankmixer-s1"
    assert run_folder("/") == "dataset" and run_folder("../..") == "dataset" and run_folder("a b:c") == "a_b_c"


def test_the_bench_protocol_reaches_every_runs_train_spec():
    spec = spec_for("tokenmixer_large", MODELS["tokenmixer_large"], 0, False, "./d", QualityParams(schedule="constant", lr=1e-3))
    assert spec.optimizer.schedule.value == "constant" and spec.optimizer.lr == 1e-3
    default = spec_for("tokenmixer_large", MODELS["tokenmixer_large"], 0, False, "./d", QualityParams())
    assert default.optimizer.schedule.value == "linear" and default.epochs == 4
