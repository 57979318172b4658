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


def test_backtest_holds_out_the_last_train_rows_and_scores_valid():
    import numpy as np
    import pytest

    from recmix.jobs.bench.quality import backtest_splits
    from recmix.jobs.train.data import SplitArrays
    from recmix.platform.errors import RecmixError

    def split(lo, n):
        ids = np.arange(lo, lo + n, dtype=np.int64)
        return SplitArrays({"x": ids}, (ids % 2).astype(np.float32)[:, None], ids)

    splits = {"train": split(0, 10), "valid": split(10, 3), "test": split(13, 3)}
    bt = backtest_splits(splits)
    assert bt["train"].columns["x"].tolist() == list(range(7)) and bt["valid"].columns["x"].tolist() == [7, 8, 9]
    assert bt["test"] is splits["valid"] and all(v is not splits["test"] for v in bt.values())   # test never read
    assert bt["valid"].user_key.tolist() == [7, 8, 9] and bt["valid"].labels[:, 0].tolist() == [1, 0, 1]
    with pytest.raises(RecmixError, match=r"params.holdout: backtest needs more train rows \(3\) than valid rows \(3\)"):
        backtest_splits({"train": split(0, 3), "valid": split(3, 3), "test": split(6, 1)})
    params = QualityParams(holdout="backtest")
    assert spec_for("dlrm_mlp", MODELS["dlrm_mlp"], 0, False, "./d/ml100k", params).output == \
        "./artifacts/runs/quality/ml100k-backtest/dlrm_mlp-s0"


def test_comparisons_split_rows_by_a_full_or_shorter_behaviour_history():
    import numpy as np

    from recmix.jobs.bench.quality import _by_history, history_lengths
    from recmix.jobs.prepare.builtin import builtin_schema
    from recmix.jobs.train.data import SplitArrays

    rng = np.random.default_rng(0)
    n = 400
    length = np.where(np.arange(n) % 4 == 0, 3, 5)          # a quarter of the rows hold 3 of 5 positions
    hist = np.where(np.arange(5)[None, :] < length[:, None], rng.integers(0, 9, (n, 5)), -1)
    y = rng.integers(0, 2, n).astype(np.float32)
    split = SplitArrays({"hist_items": hist}, y[:, None], np.arange(n) % 50)
    schema = builtin_schema(n_users=50, n_items=10, history_len=5)
    name, max_len, got = history_lengths(schema, split)
    assert (name, max_len) == ("hist_items", 5) and got.tolist() == length.tolist()

    noise = rng.random(n)
    good = np.where(length == 5, y + 0.1 * noise, noise)      # a ranks the full-history rows perfectly, b does not
    r0 = {"history": (name, max_len, got), "labels": y, "users": split.user_key}
    out = _by_history(r0, [{"probs": good}], [{"probs": noise}], n_boot=50, seed=0)
    assert out["full"]["share"] == 0.75 and out["full"]["lo95"] > 0.3
    assert out["shorter"]["delta"] == 0.0 and out["shorter"]["share"] == 0.25
