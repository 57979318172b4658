"""Every metric recmix exports through `ray.util.metrics`: name, type, tags, meaning (docs/operations.md).

Ray exports a declared name `recmix_x` as `ray_recmix_x` (counters get `_total`, histograms `_bucket`,
`_count`, `_sum`); `exported()` gives those names, which dashboards and alerts use. `make(name)` declares a
registered metric with its documented tags, so a component cannot export an undocumented one by that path;
it must be called where Ray is initialized (a task, an actor, a connected driver).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
LATENCY_BOUNDS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    component: str
    tags: tuple[str, ...]
    description: str


_GROUP = ("component", "group")  # group: the shard group (embedding.name), the train run, the dataset
_PS = _GROUP + ("shard", "table")
_TRAIN = _GROUP  # the run's driver exports them (rank 0's figures)
METRICS: tuple[Metric, ...] = (
    # embedding parameter-server shards (recmix/actors/metrics.py)
    Metric("recmix_ps_rows", "gauge", "ps", _PS + ("tier",), "rows held per tier (ram, lmdb)"),
    Metric("recmix_ps_hit_rate", "gauge", "ps", _PS + ("tier",),
           "fraction of looked-up ids served by a tier (ram, lmdb) or missing (miss), since the shard started"),
    Metric("recmix_ps_evictions", "counter", "ps", _PS, "rows evicted from RAM to the LMDB tier"),
    Metric("recmix_ps_admissions", "counter", "ps", _PS, "new ids admitted into a table"),
    Metric("recmix_ps_rejections", "counter", "ps", _PS, "new ids refused by the admission filter"),
    Metric("recmix_ps_expiries", "counter", "ps", _PS, "rows dropped after their time to live"),
    Metric("recmix_ps_latency_s", "histogram", "ps", _GROUP + ("shard", "op"), "shard handler time per request (op: pull, push, ...)"),
    # training (recmix/jobs/train/progress.py: the driver, from rank 0's figures)
    Metric("recmix_train_step", "gauge", "train", _TRAIN, "optimizer steps so far"),
    Metric("recmix_train_epoch", "gauge", "train", _TRAIN, "current epoch"),
    Metric("recmix_train_loss", "gauge", "train", _TRAIN, "latest reported loss"),
    Metric("recmix_train_train_loss", "gauge", "train", _TRAIN, "mean training loss of the last epoch"),
    Metric("recmix_train_valid_auc", "gauge", "train", _TRAIN, "validation AUC of the last evaluation"),
    Metric("recmix_train_samples_per_s", "gauge", "train", _TRAIN, "training samples per second (training time only)"),
    # serving (recmix/jobs/serve/app.py)
    Metric("recmix_serve_requests", "counter", "serve", ("component", "status"), "rank requests by HTTP status"),
    Metric("recmix_serve_user_cache", "counter", "serve", ("component", "result"), "user-state cache lookups (result: hit, miss)"),
    Metric("recmix_serve_unknown_ids", "counter", "serve", ("component",), "ids outside the training vocabulary"),
    Metric("recmix_serve_candidates", "counter", "serve", ("component",), "candidates scored (batch size = candidates / requests)"),
    Metric("recmix_serve_latency_s", "histogram", "serve", ("component",), "rank request latency inside the replica"),
    Metric("recmix_serve_model", "gauge", "serve", ("component", "version"), "1 for the model version a replica serves"),
    # data preparation (recmix/jobs/prepare: the synthetic chunk tasks; the driver for MovieLens / parquet)
    Metric("recmix_prepare_rows", "counter", "prepare", _GROUP, "rows written; group: the dataset's name"),
    Metric("recmix_prepare_rows_per_s", "gauge", "prepare", _GROUP, "rows per second of the latest chunk task"),
)
BY_NAME = {m.name: m for m in METRICS}


def exported(m: Metric) -> list[str]:
    """The Prometheus series names Ray exports for `m` (ray.md 7)."""
    base = f"ray_{m.name}"
    if m.kind == "counter":
        return [base if base.endswith("_total") else f"{base}_total"]
    if m.kind == "histogram":
        return [f"{base}_bucket", f"{base}_count", f"{base}_sum"]
    return [base]


def all_exported() -> set[str]:
    return {n for m in METRICS for n in exported(m)}


def make(name: str, **default_tags: str):
    """The registered metric `name` as a `ray.util.metrics` object, with `default_tags` set."""
    from ray.util.metrics import Counter, Gauge, Histogram

    m = BY_NAME[name]
    unknown = set(default_tags) - set(m.tags)
    assert not unknown, f"{name}: tags {sorted(unknown)} are not among its documented tags {m.tags}"
    if m.kind == "histogram":
        metric = Histogram(m.name, description=m.description, boundaries=LATENCY_BOUNDS_S, tag_keys=m.tags)
    else:
        metric = (Counter if m.kind == "counter" else Gauge)(m.name, description=m.description, tag_keys=m.tags)
    if default_tags:
        metric.set_default_tags(default_tags)
    return metric
