"""`kind: train`: Ray Train workers (DDP, gloo on CPU / NCCL on GPU) fed by Ray Data; checkpoints, resume, artifact.

Outputs under `spec.output`: `metrics.json` (valid/test AUC + logloss, warm/cold-user test AUC, history,
parameter/FLOP counts), `report.json` (per-epoch curves, throughput, world size, resume step),
`test_predictions.npy` (the test rows' probabilities, the ones the test metrics were computed from), `model.pt`
(the best epoch's state_dict, `torch.load(weights_only=True)`), `checkpoints/<name>/` (Ray Train's run
folder) and `artifact/<version>/` + `artifact/LATEST` (recmix.models.artifact). A rerun of the same spec
resumes the interrupted run from its latest checkpoint, refuses a completed one, and `restart=True`
(`recmix run --restart`) starts afresh. `train()` runs the same loop in-process (world size 1, no Ray Train)
for benches that reuse loaded splits.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable, Optional

import numpy as np
import pyarrow.fs as pafs
import torch

from recmix.models import counters
from recmix.models.build import build_model
from recmix.models.derived import fit_derived
from recmix.platform import cluster as ray_cluster
from recmix.platform import secrets, storage
from recmix.platform.dataset import open_dataset
from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.train import TrainSpec

from . import artifact, curves, state, warm_start
from .data import SplitArrays, to_arrays
from .loop import ArrayFeed, FitResult, LocalContext, fit, lr_schedule, make_optimizer, train_step  # noqa: F401  (train_step: the public unit)
from .progress import Progress, TrainGauges

COMPLETE = "_recmix_complete.json"   # written into the run folder once the artifact is published
CURVES = "curves.png"                # train loss and valid AUC per epoch (curves.py)
PREDICTIONS = "test_predictions.npy"  # (N_test, K) float32 probabilities of the best epoch, in the test split's row order


def load_splits(spec: TrainSpec, names: tuple[str, ...] = ("train", "valid", "test")):
    ds = open_dataset(spec.dataset.uri, spec.storage)
    splits = {s: to_arrays(ds.read_split(s), ds.schema) for s in names}
    return ds.schema, splits


@dataclass(kw_only=True)
class TrainResult(FitResult):
    model: torch.nn.Module | None       # the best epoch's weights (in-process runs only)
    wall_s: float
    arch: str
    seed: int
    counts: dict                        # parameter / FLOP counts (models/counters.py)
    world_size: int = 1
    embeddings: str | None = None       # URI of the parameter-server checkpoint (with `embedding:`)
    ps_rows: list | None = None         # per-shard row counts at the end (with `embedding:`)
    artifact: str | None = None         # URI of the published artifact version

    def metrics(self) -> dict:
        """What metrics.json holds (besides the spec): everything but the model, states and test probabilities."""
        skip = {"model", "test_probs", "best_state"} | ({"embeddings", "ps_rows"} if self.embeddings is None else set())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def train(spec: TrainSpec, splits: dict[str, SplitArrays] | None = None, schema=None, log=print, write: bool = True,
          cluster=None) -> TrainResult:
    """The training loop in this process (world size 1): `splits`/`schema` may be passed in to reuse loaded
    data across runs (benches). With `spec.embedding` the sparse tables live in parameter-server shards on
    the Ray cluster `cluster`. Writes metrics.json and model.pt (no checkpoints, no artifact)."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if splits is None:
        schema, splits = load_splits(spec)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    sharded = None
    if spec.embedding is not None:
        from .sparse import ShardedTables

        sharded = ShardedTables(spec, schema, cluster)
    embeddings = ps_rows = None
    t0 = time.perf_counter()
    try:
        model = build_model(spec.model, schema, sharded.lookup if sharded else None)
        train_split = splits["train"]   # statistics of the derived features (item neighbours): training split only
        fit_derived(model, lambda cols: ({c: train_split.columns[c] for c in cols}, train_split.labels[:, 0]))
        if spec.init_from is not None:
            log(warm_start.apply(model, spec.init_from, spec.storage))
        opt = make_optimizer(model, spec.optimizer)
        feed = ArrayFeed(splits["train"], splits["valid"], splits["test"], spec.batch_size, spec.seed)
        fitted = fit(model, opt, feed, LocalContext(log), eval_batch_size=spec.eval_batch_size, epochs=spec.epochs,
                     patience=spec.early_stopping.patience, sparse=sharded,
                     schedule=lr_schedule(spec.optimizer, spec.epochs * feed.steps_per_epoch))
        if sharded is not None and write:
            embeddings = sharded.save_final()
            ps_rows = sharded.lookup.client.counts()
    finally:
        if sharded is not None:
            sharded.close()
    res = _result(spec, schema, fitted, time.perf_counter() - t0, model=model, embeddings=embeddings, ps_rows=ps_rows)
    if write:
        _write_outputs(spec, res, log)
    return res


def _result(spec: TrainSpec, schema, fitted: FitResult, wall: float, **kw) -> TrainResult:
    return TrainResult(**{f.name: getattr(fitted, f.name) for f in fields(FitResult)}, wall_s=round(wall, 2),
                       arch=spec.model.arch, seed=spec.seed, counts=counters.model(spec.model, schema), **kw)


def _write_outputs(spec: TrainSpec, res: TrainResult, log) -> None:
    fs, root = storage.resolve(spec.output, spec.storage)
    buf = io.BytesIO()
    torch.save(res.best_state, buf)
    storage.write_bytes_atomic(fs, storage.join(root, "model.pt"), buf.getvalue())
    doc = {**res.metrics(), "spec": secrets.spec_dump(spec)}  # no ${VAR} secret value reaches a file
    storage.write_bytes_atomic(fs, storage.join(root, "metrics.json"), json.dumps(doc, indent=2, default=float).encode())
    report = {"history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "steps": res.steps,
              "resumed_from_step": res.resumed_from_step, "world_size": res.world_size, "wall_s": res.wall_s,
              "train_samples_per_s": res.train_samples_per_s, "valid": res.valid, "test": res.test,
              "artifact": res.artifact}
    storage.write_bytes_atomic(fs, storage.join(root, "report.json"), json.dumps(report, indent=2, default=float).encode())
    storage.write_bytes_atomic(fs, storage.join(root, CURVES), curves.png_bytes(curves.render(res.history, res.best_epoch)))
    buf = io.BytesIO()
    np.save(buf, np.asarray(res.test_probs, np.float32), allow_pickle=False)
    storage.write_bytes_atomic(fs, storage.join(root, PREDICTIONS), buf.getvalue())
    log(f"[train] wrote {spec.output}/metrics.json, report.json, {CURVES}, {PREDICTIONS} and model.pt")


# --- the Ray Train run ------------------------------------------------------------------------------------

def _run_folder(spec: TrainSpec) -> tuple[pafs.FileSystem, str]:
    fs, root = storage.resolve(spec.output, spec.storage)
    return fs, storage.join(root, "checkpoints", spec.name)


def _exists(fs, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train's record of the checkpoints it registered


def latest_checkpoint(fs, run: str) -> Optional[str]:
    """Path of the checkpoint a rerun resumes from: the latest one Ray Train registered in its snapshot (a
    folder it never registered, say one cut off mid-upload, is not resumed by Ray either)."""
    import re

    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
             if i.type is pafs.FileType.Directory and re.match(r"^checkpoint-\d{9}-[01]$", i.base_name)]
    snap = storage.join(run, RAY_SNAPSHOT)
    if not _exists(fs, snap):
        if names:
            raise RecmixError(f"run folder {run} holds checkpoints ({max(names)}) but no {RAY_SNAPSHOT} (partial); "
                              "rerun with --restart for a fresh run")
        return None
    try:
        latest = (storage.read_json(fs, snap).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (ValueError, AttributeError):
        raise RecmixError(f"run folder {run}: {RAY_SNAPSHOT} is not valid JSON (truncated?); rerun with --restart "
                          "for a fresh run") from None
    return storage.join(run, latest) if latest else None


def preflight(spec: TrainSpec, restart: bool, log) -> Optional[str]:
    """Before any work: clear the run (restart), refuse a completed one, or verify the checkpoint a resume
    will start from. Returns that checkpoint's path, or None for a fresh run."""
    fs, run = _run_folder(spec)
    lmdb = spec.embedding.lmdb_path if spec.embedding is not None else None
    if restart:
        if _exists(fs, run):
            fs.delete_dir(run)
            log(f"[train] --restart: removed the previous run folder {run}")
        if lmdb and os.path.isdir(lmdb):
            shutil.rmtree(lmdb)
        return None
    if _exists(fs, storage.join(run, COMPLETE)):
        done = storage.read_json(fs, storage.join(run, COMPLETE))
        auc = done.get("test_auc")
        shown = f"{auc:.4f}" if isinstance(auc, (int, float)) else "n/a"
        raise RecmixError(f"run '{spec.name}' in {spec.output} already completed (artifact {done.get('artifact')}, test AUC "
                          f"{shown}); rerun with --restart to train it again, or set a new output or name")
    latest = latest_checkpoint(fs, run) if _exists(fs, run) else None
    if latest is None:
        if lmdb and os.path.isdir(lmdb) and os.listdir(lmdb):
            raise RecmixError(f"embedding.lmdb_path: {lmdb} holds the rows of an earlier run and there is no checkpoint to "
                              "resume; rerun with --restart to start afresh (it clears that folder)")
        return None
    log(f"[train] resuming run '{spec.name}' from {latest.rsplit('/', 1)[-1]} (step {_verify(fs, latest)}); "
        "--restart starts afresh")
    return latest


def recheck(spec: TrainSpec, verified: Optional[str], log) -> None:
    """Right before Ray Train starts: the checkpoint it will resume from is the one `preflight` verified, or a
    newer one, verified and announced here. A driver killed by SIGKILL leaves its Ray Train controller and
    workers running for a few seconds (measured 4-5 s: they are their own process groups and exit once they
    notice their raylet gone), long enough to register one more checkpoint after the rerun's first check."""
    fs, run = _run_folder(spec)
    latest = latest_checkpoint(fs, run) if _exists(fs, run) else None
    if latest == verified or latest is None:   # None: no checkpoint then, and none now (a fresh run)
        return
    log(f"[train] resuming run '{spec.name}' from {latest.rsplit('/', 1)[-1]} (step {_verify(fs, latest)}) instead: the "
        "interrupted run registered it after the first check (its Ray Train processes outlived their driver)")


def _verify(fs, latest: str) -> int:
    """The step of the complete checkpoint folder `latest` (a RecmixError naming it when partial or corrupt)."""
    with tempfile.TemporaryDirectory(prefix="recmix-verify-") as tmp:
        if isinstance(fs, pafs.LocalFileSystem):
            local = latest
        else:
            local = os.path.join(tmp, "ck")
            pafs.copy_files(latest, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return state.verify(local, latest)["state"]["step"]


def absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute here: Ray Train workers run in another working directory."""
    def local(uri: str) -> str:
        return uri if storage.is_s3(uri) else storage.resolve(uri)[1]

    update = {"dataset": spec.dataset.model_copy(update={"uri": local(spec.dataset.uri)}), "output": local(spec.output)}
    if spec.init_from is not None:
        update["init_from"] = local(spec.init_from)
    if spec.embedding is not None and spec.embedding.lmdb_path:
        update["embedding"] = spec.embedding.model_copy(update={"lmdb_path": os.path.abspath(spec.embedding.lmdb_path)})
    return spec.model_copy(update=update)


def check_resources(spec: TrainSpec) -> None:
    """More workers than the cluster can place would wait forever: refuse before training, naming the numbers."""
    import ray

    total = ray.cluster_resources()
    sc = spec.scaling
    n = sc.workers[0] if isinstance(sc.workers, tuple) else sc.workers
    cpus, have = n * sc.cpus_per_worker, float(total.get("CPU", 0))
    emb = spec.embedding
    shards = emb.shards * emb.num_cpus if emb is not None else 0.0
    if cpus + shards + 1 > have:   # Ray Data's read tasks need a CPU beside the workers' (they would starve otherwise)
        also = f", the embedding shards {shards:g}" if shards else ""
        raise RecmixError(f"scaling: {n} workers x {sc.cpus_per_worker:g} CPU need {cpus:g} CPUs{also} plus 1 for Ray Data; "
                          f"the cluster has {have:g} (lower scaling.workers or scaling.cpus_per_worker, or add CPUs)")
    if sc.use_gpu and float(total.get("GPU", 0)) < n:
        raise RecmixError(f"scaling: {n} workers with use_gpu need {n} GPUs; the cluster has {total.get('GPU', 0):g}")


def failure_line(err: BaseException) -> Optional[str]:
    """The first line of a RecmixError (a user-facing failure: a parameter-server push past its retries, a
    dataset changed under the run, a corrupt checkpoint) behind a failed Ray Train run, else None (a bug:
    its traceback is kept). Ray Train wraps worker errors (WorkerGroupError.worker_failures), Ray wraps task
    errors (RayTaskError.cause)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RecmixError):
            return (str(e.args[0]) if e.args else str(e)).splitlines()[0]
        todo += [*getattr(e, "worker_failures", {}).values(), getattr(e, "controller_failure", None),
                 getattr(e, "cause", None), e.__cause__]
    return None


def run(spec: TrainSpec, cluster: Optional[ClusterConfig] = None, *, restart: bool = False,
        log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """CLI entry (`recmix run train.yaml [--restart]`): train with Ray Train, publish, return the summary."""
    spec = absolute_paths(spec)
    ds = open_dataset(spec.dataset.uri, spec.storage)   # a missing dataset is one line before Ray starts
    if spec.init_from is not None:   # a missing source is one line before Ray starts; the workers load and check it
        warm_start.locate_source(spec.init_from, spec.storage)
    storage.check_writable(spec.output, spec.storage)
    _check_train_columns(ds)
    verified = preflight(spec, restart, log)
    with ray_cluster.cluster(cluster or spec.cluster, echo=log):
        check_resources(spec)
        recheck(spec, verified, log)
        return _fit_on_ray(spec, ds, log)


def _check_train_columns(ds) -> None:
    """Ray Data reads the train files directly: their column types are checked against the manifest first."""
    import pyarrow.parquet as pq

    from recmix.platform.dataset import check_columns

    files = ds.split_files("train")
    if not files:
        raise RecmixError(f"{ds.uri}: split 'train' lists no files")
    try:
        actual = pq.read_schema(files[0], filesystem=ds.filesystem)
    except OSError as e:
        raise RecmixError(f"{ds.uri}: cannot read {files[0]}: {str(e).splitlines()[0]}") from None
    check_columns(actual, ds.schema, ds.uri, [f.name for f in ds.schema.features])


def _fit_on_ray(spec: TrainSpec, ds, log) -> dict:
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import train_loop_per_worker

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    fs, out_root = storage.resolve(spec.output, spec.storage)
    version = artifact.new_version()
    serving = "embeddings" if spec.embedding is not None else None
    columns = [f.name for f in ds.schema.features]
    # A global shuffle per epoch: the dataset re-executes (unseeded) every time the workers iterate it.
    train_ds = ray.data.read_parquet(ds.split_files("train"), filesystem=ds.filesystem, columns=columns).random_shuffle()
    sc = spec.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}
    group = None
    if spec.embedding is not None:
        from . import ps_group

        group = ps_group.create(spec, ds.schema)
    progress = Progress(log, TrainGauges(spec.name))
    config = {"spec": spec, "dataset_version": ds.version, "progress": progress.queue, "group": group and group.ref,
              "serving_uri": storage.join(artifact.version_uri(spec, version), serving) if serving else None}
    s3 = not isinstance(fs, pafs.LocalFileSystem)
    run_config = RunConfig(name=spec.name, storage_path=storage.join(out_root, "checkpoints"),
                           storage_filesystem=fs if s3 else None,
                           checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                           failure_config=FailureConfig(max_failures=spec.failure.max_failures))
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=sc.workers, use_gpu=sc.use_gpu,
                                                        resources_per_worker=resources),
                           torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
                           run_config=run_config, datasets={"train": train_ds})
    shown = f"{sc.workers[0]}-{sc.workers[1]} (elastic)" if isinstance(sc.workers, tuple) else sc.workers
    log(f"[train] Ray Train: {shown} worker(s) x {sc.cpus_per_worker:g} CPU{' + 1 GPU' if sc.use_gpu else ''}, "
        f"run '{spec.name}' in {storage.join(spec.output, 'checkpoints', spec.name)}")
    import signal

    sigint = signal.getsignal(signal.SIGINT)
    try:
        # fit() installs Ray Train's Ctrl-C handler: it aborts the run and exits the process (SystemExit) or
        # returns no result; both become KeyboardInterrupt (one line, exit 130; the checkpoints stay)
        result = trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    except Exception as e:
        line = failure_line(e)
        if line is None:
            raise
        raise RecmixError(f"Ray Train run '{spec.name}' failed: {line}; its checkpoints stay (running the spec again "
                          "resumes)") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        progress.close()
        if group is not None:
            group.destroy()
    out = result.return_value
    if not out and result.error is None:
        raise KeyboardInterrupt   # aborted by Ctrl-C: the checkpoints stay, a rerun resumes
    if not out or "fit" not in out:
        line = failure_line(result.error) if result.error is not None else None
        if line is not None:
            raise RecmixError(f"Ray Train run '{spec.name}' failed: {line}; its checkpoints stay (running the spec "
                              "again resumes)")
        raise RuntimeError(f"Ray Train run '{spec.name}' ended without a result from rank 0 ({result.error!r})")
    fitted: FitResult = out["fit"]
    res = _result(spec, ds.schema, fitted, time.perf_counter() - t0, model=None, world_size=out["world_size"],
                  embeddings=out.get("embeddings"), ps_rows=out.get("ps_rows"))
    metrics = {"valid": res.valid, "test": res.test, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run}
    res.artifact = artifact.publish(spec, version, ds.schema, fitted.best_state, metrics, serving)
    _write_outputs(spec, res, log)
    run_fs, run = _run_folder(spec)
    storage.write_bytes_atomic(run_fs, storage.join(run, COMPLETE), json.dumps(
        {"artifact": version, "test_auc": res.test["auc"]}).encode())
    log(f"[train] artifact {res.artifact}")
    log(f"[train] test AUC {res.test['auc']:.4f}  logloss {res.test['logloss']:.4f}")
    return {k: v for k, v in res.metrics().items() if k != "history"}
