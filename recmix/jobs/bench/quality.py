"""`recmix bench quality`: DLRM-MLP vs RankMixer vs TokenMixer-Large (dense, S-P MoE 1:2, UG-Sep 1:1) on ml-100k.

Full: 5 models x seeds 0, 1, 2 on the evaluation contract (train 80k / valid 10k / test 10k by time),
early stopping on valid AUC, test scored once with the best epoch; mean and sample std (ddof = 1) over
seeds of test AUC, logloss, warm-user and cold-user AUC, plus paired bootstraps over users
(TokenMixer-Large vs RankMixer, RankMixer vs DLRM, MoE vs dense, UG-Sep vs dense) of the mean-over-seeds
difference, with each seed's own interval beside it, and the same for the rows whose behaviour history is full
(all `max_len` positions) and the shorter ones.
Every model gets the dataset schema's inputs, its sequence tokens (docs/models.md) included. Runs go to a
pool of `workers` (default 2) single-threaded processes; each writes its outputs (metrics, test predictions)
to `./artifacts/runs/quality/<dataset folder name>/<model>-s<seed>`.
Quick: seed 0, one epoch on the first 4,000 training rows, 2,000 valid/test rows, in-process (a smoke test
of the same path, not a result).

Parameters (`QualityParams`, `recmix bench quality --set key=value`): `dataset` (a prepared dataset URI, default
`${RECMIX_ARTIFACTS:-./artifacts}/ml100k`), prepared from the raw MovieLens-100K folder `ml100k` (default: the
`RECMIX_ML100K` environment variable) when it has no manifest; point `dataset` at a synthetic dataset with the
same schema to compare on planted interactions. `seeds` (default 0,1,2), `workers`, `models` (a subset; the
optional `tokenmixer_large_lmn` and `tokenmixer_large_ugsep_1_1_no_global` run only when named), and
the protocol: `lr`, `schedule`, `weight_decay`, `batch_size`, `epochs`, `patience` (defaults: the valid-only sweep of
docs/models.md). `holdout=backtest` chooses between configurations without reading test: each run trains on the
train split less its last |valid| rows (the split is stored in time order), selects its epoch on those rows, and
scores the valid split where the report says "test"; its runs go to `<dataset folder>-backtest`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from recmix.platform.bench import BenchReport
from recmix.platform.errors import RecmixError
from recmix.platform.specs.bench import Holdout, QualityParams

# [choice] TokenMixer-Large and RankMixer share chunk tokens (T = 8, D = 32, L = 2): group_mlp's 5 tokens trailed
# RankMixer by 0.022 test AUC on planted synthetic data and chunk tokens led it (docs/models.md). Every model
# gets the same inputs, the schema's sequence tokens included.
_TML = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=8, d_model=32,
            n_layers=2, ffn_mult=2.0)
MODELS: dict[str, dict] = {
    "dlrm_mlp": dict(arch="dlrm_mlp", hidden=[128, 64]),
    "rankmixer": dict(arch="rankmixer", tokenizer="chunk_per_token", n_tokens=8, d_model=32, n_layers=2, ffn_mult=2.0),
    "tokenmixer_large": _TML,
    # [choice] the spec's default split, E = 8 experts with K = 4 active (shared one included): on valid of the planted
    # field cross it trailed dense by 0.0016, E = 4 / K = 2 by 0.0028 (3 seeds; docs/log.md)
    "tokenmixer_large_moe_1_2": {**_TML, "moe": dict(n_experts=8, n_active=4)},
    # [choice] without Information Compensation: on ml-100k valid (3 seeds) IC per_head trailed no IC by 0.0007 (linear
    # schedule) and 0.0015 (constant lr); near U:G = 1:1 the residual carries what the mask removes. With the spec's
    # candidate-side global token (an MLP over all features, one of the 4 candidate tokens): on the backtest (12 seeds,
    # test never read) UG-Sep's per-side tokens trailed on rows with full 50-item histories by 0.0031 and the global
    # token won back 0.0018 [0.0006, 0.0035] there, +0.0006 on all rows (docs/models.md, docs/log.md)
    "tokenmixer_large_ugsep_1_1": {**_TML, "global_token": "mlp", "ugsep": dict(user_tokens="1:1", ic_mode="none")},
}
PAIRS = [("tokenmixer_large", "rankmixer"), ("rankmixer", "dlrm_mlp"), ("tokenmixer_large_moe_1_2", "tokenmixer_large"),
         ("tokenmixer_large_ugsep_1_1", "tokenmixer_large")]
# Run only when named in `models` (--set models=tokenmixer_large,tokenmixer_large_lmn): TokenMixer-Large with the
# LMN memory read-out (docs/lmn.md), a 4,096-slot memory for ml-100k's 1,682 items.
# UG-Sep 1:1 as benched until the seventh session (no global token): `--set holdout=backtest --set
# models=tokenmixer_large,tokenmixer_large_ugsep_1_1,tokenmixer_large_ugsep_1_1_no_global` repeats the choice.
OPTIONAL: dict[str, dict] = {
    "tokenmixer_large_lmn": {**_TML, "memory": dict(n_sub=64, d_key=32, d_value=16, k_axis=8, top_k=8)},
    "tokenmixer_large_ugsep_1_1_no_global": {**_TML, "ugsep": dict(user_tokens="1:1", ic_mode="none")},
}
OPTIONAL_PAIRS = [("tokenmixer_large_lmn", "tokenmixer_large"),
                  ("tokenmixer_large_ugsep_1_1", "tokenmixer_large_ugsep_1_1_no_global"),
                  ("tokenmixer_large_ugsep_1_1_no_global", "tokenmixer_large")]


def dataset_uri(params: QualityParams) -> str:
    return params.dataset or os.path.join(os.environ.get("RECMIX_ARTIFACTS", "./artifacts"), "ml100k")


def _ensure_dataset(uri: str, params: QualityParams) -> None:
    if os.path.exists(os.path.join(uri, "_manifest.json")) or "://" in uri:
        return
    from recmix.jobs.prepare import run as prepare
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.prepare import PrepareSpec

    src = params.ml100k or os.environ.get("RECMIX_ML100K")
    if not src:
        raise RecmixError(f"params.dataset: no prepared dataset at '{uri}'; set params.ml100k (--set ml100k=DIR) or the "
                          "RECMIX_ML100K environment variable to the MovieLens-100K folder to prepare it from")
    prepare(PrepareSpec(kind="prepare", source=dict(type="movielens100k", path=src), output=dict(uri=uri)), ClusterConfig())


def run_folder(uri: str) -> str:
    """The dataset's last path component, as one safe folder name: runs on other datasets do not overwrite these."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1]).lstrip(".") or "dataset"


def spec_for(name: str, model: dict, seed: int, quick: bool, uri: str, params: QualityParams):
    from recmix.platform.specs.train import TrainSpec

    folder = run_folder(uri) + ("-backtest" if params.holdout is Holdout.backtest else "")
    return TrainSpec(kind="train", dataset=dict(uri=uri), model=model, seed=seed, threads=1, batch_size=params.batch_size,
                     epochs=1 if quick else params.epochs, early_stopping=dict(patience=params.patience),
                     output=f"./artifacts/runs/quality/{folder}/{name}-s{seed}",
                     optimizer=dict(name="adamw", lr=params.lr, weight_decay=params.weight_decay, schedule=params.schedule))


def backtest_splits(splits: dict) -> dict:
    """train less its last |valid| rows / those rows / valid: the contract's shape one period earlier."""
    train, valid = splits["train"], splits["valid"]
    n, v = len(train), len(valid)
    if n <= v:
        raise RecmixError(f"params.holdout: backtest needs more train rows ({n}) than valid rows ({v})")
    return {"train": train.slice(0, n - v), "valid": train.slice(n - v, n), "test": valid}


def history_lengths(schema, split) -> tuple[str, int, np.ndarray] | None:
    """(name, max_len, per-row length) of the schema's first tokenized sequence feature (the behaviour history),
    or None: the bench splits every comparison into rows with a full history and the rest."""
    f = next((f for f in schema.inputs if f.tokens is not None), None)   # the schema allows tokens on sequences only
    if f is None:
        return None
    return f.name, int(f.max_len), (np.asarray(split.columns[f.name]) >= 0).sum(1)


def _one(args) -> dict:
    name, model, seed, quick, uri, params = args
    from recmix.jobs.train import load_splits, train

    spec = spec_for(name, model, seed, quick, uri, params)
    if params.holdout is Holdout.backtest:     # the contract's test split is not even read
        schema, splits = load_splits(spec, ("train", "valid"))
        splits = backtest_splits(splits)
    else:
        schema, splits = load_splits(spec)
    if quick:   # a smoke test of the same path: 4,000 train rows, 2,000 valid/test rows
        for split, n in (("train", 4000), ("valid", 2000), ("test", 2000)):
            splits[split] = splits[split].slice(0, n)
    res = train(spec, splits, schema, log=lambda s: print(f"[{name} s{seed}] {s}", flush=True), write=not quick)
    return {"name": name, "seed": seed, "test": res.test, "valid_auc": res.valid["auc"], "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run, "params_dense": res.counts["dense"]["params"],
            "flops": res.counts["dense"]["flops"], "samples_per_s": res.train_samples_per_s,
            "probs": res.test_probs[:, 0], "labels": splits["test"].labels[:, 0], "users": splits["test"].user_key,
            "history": history_lengths(schema, splits["test"])}


def _by_history(r0: dict, runs_a: list[dict], runs_b: list[dict], n_boot: int, seed: int) -> dict:
    """The pair's paired bootstrap on the rows with a full history and on the rest (None for a subset that is
    empty or holds one class only)."""
    from recmix.jobs.train.metrics import paired_bootstrap

    _, max_len, length = r0["history"]
    out = {}
    for key, rows in (("full", length >= max_len), ("shorter", length < max_len)):
        y = r0["labels"][rows]
        if len(np.unique(y)) < 2:
            out[key] = None
            continue
        pair = paired_bootstrap(y, np.stack([r["probs"][rows] for r in runs_a]), np.stack([r["probs"][rows] for r in runs_b]),
                                r0["users"][rows], n=n_boot, seed=seed)
        out[key] = {k: pair[k] for k in ("delta", "lo95", "hi95")} | {"share": float(rows.mean())}
    return out


def run(quick: bool, params: QualityParams) -> BenchReport:
    models = MODELS | {n: m for n, m in OPTIONAL.items() if n in params.models}
    return compare(models, PAIRS + OPTIONAL_PAIRS, quick, params, "quality: test split, mean ± std over seeds")


def compare(models: dict[str, dict], pairs: list[tuple[str, str]], quick: bool, params: QualityParams, title: str) -> BenchReport:
    """Train every model config on every seed (process pool), then tabulate and bootstrap the pairs."""
    from recmix.jobs.train.metrics import paired_bootstrap

    uri = dataset_uri(params)
    _ensure_dataset(uri, params)
    seeds = [0] if quick else list(params.seeds)
    unknown = sorted(set(params.models) - set(models))
    if unknown:
        raise RecmixError(f"params.models: unknown models {unknown} (known: {', '.join(models)})")
    models = {n: m for n, m in models.items() if not params.models or n in params.models}
    pairs = [(a, b) for a, b in pairs if a in models and b in models]
    jobs = [(n, m, s, quick, uri, params) for s in seeds for n, m in models.items()]
    workers = params.workers
    if quick:   # in-process: spawning workers (each importing torch) costs more than the quick runs
        runs = [_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            runs = list(pool.map(_one, jobs))
    by = {n: [r for r in runs if r["name"] == n] for n in models}
    rows, results = [], {"dataset": uri, "seeds": seeds, "models": {}, "pairs": {}, "by_history": {}}
    for n, rs in by.items():
        def ms(key, sub="test"):
            # None, not NaN, when a split has one class only (quick mode's warm rows): the JSON line stays strict
            # sample standard deviation over seeds (ddof = 1); None with one seed
            v = np.array([r[sub][key] if sub else r[key] for r in rs], dtype=float)
            if np.isnan(v).any():
                return None, None
            return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)
        auc_m, auc_s = ms("auc")
        stats = {"test_auc": [auc_m, auc_s], "test_logloss": list(ms("logloss")), "auc_warm": list(ms("auc_warm")),
                 "auc_cold": list(ms("auc_cold")), "valid_auc": list(ms("valid_auc", None)),
                 "epochs": [r["epochs_run"] for r in rs], "params_dense": rs[0]["params_dense"], "flops": rs[0]["flops"],
                 "per_seed_test_auc": [r["test"]["auc"] for r in rs], "best_epochs": [r["best_epoch"] for r in rs]}
        results["models"][n] = stats
        f4 = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        rows.append([n, f"{f4(auc_m)} ± {f4(auc_s)}", f4(stats["test_logloss"][0]), f4(stats["auc_warm"][0]),
                     f4(stats["auc_cold"][0]), f4(stats["valid_auc"][0]), rs[0]["params_dense"],
                     "/".join(str(e) for e in stats["epochs"])])
    for a, b in pairs:
        ra0 = by[a][0]
        assert all(np.array_equal(r["labels"], ra0["labels"]) for r in by[a] + by[b]), "runs scored different test rows"
        n_boot = 50 if quick else 200
        # the claim is the mean over seeds: each resample of users scores every seed's pair of models
        pair = paired_bootstrap(ra0["labels"], np.stack([r["probs"] for r in by[a]]), np.stack([r["probs"] for r in by[b]]),
                                ra0["users"], n=n_boot, seed=seeds[0])
        pair["seeds_resolved"] = sum(lo > 0 or hi < 0 for _, lo, hi in pair["per_seed"])
        results["pairs"][f"{a}-{b}"] = pair
        if ra0["history"] is not None:
            results["by_history"][f"{a}-{b}"] = _by_history(ra0, by[a], by[b], n_boot, seeds[0])
    notes = [f"dataset {uri}; seeds {seeds}; paired bootstrap over users of the mean-over-seeds difference "
             "(seeds whose own interval excludes 0): " +
             "; ".join(f"{k}: d={v['delta']:+.4f} [{v['lo95']:+.4f}, {v['hi95']:+.4f}] ({v['seeds_resolved']}/{len(seeds)})"
                       for k, v in results["pairs"].items())]
    if results["by_history"]:
        name, max_len, _ = by[next(iter(models))][0]["history"]
        notes.append(f"by history: rows whose {name} holds all {max_len} positions / the shorter ones: " + "; ".join(
            f"{k}: " + " / ".join(f"{v['delta']:+.4f} [{v['lo95']:+.4f}, {v['hi95']:+.4f}] ({v['share']:.0%})"
                                  for v in (h["full"], h["shorter"]) if v is not None)
            for k, h in results["by_history"].items()))
    if quick:
        notes.append("quick: seed 0, 1 epoch on 4,000 training rows, 2,000 valid/test rows -- a smoke test, not a quality figure")
    protocol = params.model_dump(mode="json", include={"lr", "schedule", "weight_decay", "batch_size", "epochs",
                                                       "patience", "holdout"})
    notes.append(f"protocol: adamw {protocol}; early stopping on valid AUC, test scored once with the best epoch; "
                 "std over seeds with ddof = 1")
    if params.holdout is Holdout.backtest:
        title += " (backtest: 'test' is the valid split, 'valid' the last train rows; test never read)"
    return BenchReport(title=title,
                       columns=["model", "test AUC", "logloss", "warm AUC", "cold AUC", "valid AUC", "dense params", "epochs"],
                       rows=rows, results=results, config={"models": models, "quick": quick, "protocol": protocol}, notes=notes)
