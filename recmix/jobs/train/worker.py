"""What each Ray Train worker runs: build the model on its device, wrap it for DDP, feed it from its Ray Data
shard, and hand the loop (`loop.fit`) a Context made of Ray Train's report/checkpoint and torch.distributed.

Rank 0 returns the run's result (`result.return_value` in the driver); every rank reports the same number of
times (a report is a barrier).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch

from recmix.models.build import build_model
from recmix.models.derived import fit_derived
from recmix.platform.dataset import open_dataset
from recmix.platform.errors import RecmixError
from recmix.platform.specs.train import TrainSpec

from . import warm_start
from .data import SplitArrays, collate, to_arrays
from .loop import fit, lr_schedule, make_optimizer


def checkpoint_name(step: int, epoch_end: bool) -> str:
    """Sorts by step, an epoch-end checkpoint after a step checkpoint of the same step."""
    return f"checkpoint-{step:09d}-{int(epoch_end)}"


def private_copy(ck) -> str:
    """A local copy of `ck` (also from S3) in a folder of this worker's own, which the caller removes.

    `Checkpoint.to_directory()` without a path gives every worker on a node the same folder, and a worker
    that takes the download lock after another has finished downloads again over the files that the other
    is reading: a resumed run then refused a checkpoint whose `rng.pt` read as 0 bytes."""
    return ck.to_directory(tempfile.mkdtemp(prefix="recmix-resume-"))


class RayContext:
    checkpoints = True

    def __init__(self, progress=None):
        import ray.train
        import ray.train.torch

        c = ray.train.get_context()
        self.rank, self.world_size = c.get_world_rank(), c.get_world_size()
        self.device = ray.train.torch.get_device()
        self._progress = progress

    def log(self, line: str) -> None:
        if self._progress is not None:
            self._progress.put_nowait(line)

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        import ray.train

        ck = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = checkpoint_name(metrics["step"], "valid_auc" in metrics)
        self.observe(metrics)
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ck,
                         checkpoint_dir_name=name)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def observe(self, figures: dict) -> None:
        """Rank 0's figures (step, loss, samples/s, ...) for the driver's gauges (progress.py)."""
        if self._progress is not None and self.rank == 0:
            self._progress.put_nowait({k: v for k, v in figures.items() if isinstance(v, (int, float))})

    def latest_checkpoint(self) -> Optional[tuple[str, str]]:
        import ray.train

        ck = ray.train.get_checkpoint()
        return None if ck is None else (private_copy(ck), ck.path)

    def gather(self, obj) -> list:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class ShardFeed:
    """This rank's streaming shard of the train split (reshuffled every epoch by the driver's dataset) and its
    contiguous slice of valid and test (rank order = row order, so gathered predictions line up with the split)."""

    def __init__(self, spec: TrainSpec, ds, shard, rank: int, world_size: int):
        self.schema, self.shard = ds.schema, shard
        self.batch_size = max(1, spec.batch_size // world_size)
        per_rank = ds.rows("train") // world_size
        self.steps_per_epoch = -(-per_rank // self.batch_size)
        self.valid, self.test = (_rank_slice(to_arrays(ds.read_split(s), ds.schema), rank, world_size) for s in ("valid", "test"))
        self.warm_users = warm_users(ds)

    def train_batches(self, epoch: int):
        for table in self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow", prefetch_batches=2):
            yield collate(table, self.schema)


def _rank_slice(a: SplitArrays, rank: int, world_size: int) -> SplitArrays:
    n = len(a)
    return a.slice(rank * n // world_size, (rank + 1) * n // world_size)


def warm_users(ds) -> Optional[np.ndarray]:
    """Users with a train row, read from the dataset's train split (None without a `user_key` column)."""
    try:
        t = ds.read_split("train", columns=["user_key"])
    except RecmixError:
        return None
    return np.unique(t.column("user_key").to_numpy())


def wrap(model: torch.nn.Module, ctx) -> torch.nn.Module:
    if ctx.world_size == 1:
        return model
    # find_unused_parameters: MoE experts a batch routes nothing to, and towers a mode leaves out, get no gradient.
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _read_train(ds, columns: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The whole training split's `columns` (ids) and first label, for the derived features' statistics."""
    label = ds.schema.labels[0].name
    t = ds.read_split("train", columns=[*columns, label])
    return {c: t.column(c).to_numpy().astype(np.int64) for c in columns}, t.column(label).to_numpy().astype(np.float32)


def train_loop_per_worker(config: dict) -> dict:
    import ray.train

    spec: TrainSpec = config["spec"]
    ctx = RayContext(config.get("progress"))
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    ds = open_dataset(spec.dataset.uri, spec.storage)
    if ds.version != config["dataset_version"]:
        raise RecmixError(f"{spec.dataset.uri}: the dataset changed during the run (version {ds.version}, "
                          f"started on {config['dataset_version']})")
    pids = ctx.gather(os.getpid())
    if ctx.rank == 0:
        ctx.log(f"[train] worker group: {ctx.world_size} rank(s), pids {' '.join(map(str, pids))}, device {ctx.device}")
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    tables = None
    if spec.embedding is not None:
        from .ps_group import WorkerTables

        tables = WorkerTables(spec, ds.schema, config["group"], ctx)
    try:
        model = build_model(spec.model, ds.schema, tables.lookup if tables else None)
        fit_derived(model, lambda cols: _read_train(ds, cols))   # every rank fits the same statistics (deterministic)
        if spec.init_from is not None:   # every rank loads the same weights; a resumed checkpoint overrides them in fit
            said = warm_start.apply(model, spec.init_from, spec.storage)
            if ctx.rank == 0:
                ctx.log(said)
        model = model.to(ctx.device)
        opt = make_optimizer(model, spec.optimizer)
        feed = ShardFeed(spec, ds, ray.train.get_dataset_shard("train"), ctx.rank, ctx.world_size)
        res = fit(wrap(model, ctx), opt, feed, ctx, eval_batch_size=spec.eval_batch_size, epochs=spec.epochs,
                  patience=spec.early_stopping.patience, every_steps=spec.checkpoint.every_steps,
                  meta={"dataset_version": ds.version}, sparse=tables,
                  schedule=lr_schedule(spec.optimizer, spec.epochs * feed.steps_per_epoch))
        extra = {}
        if tables is not None and ctx.rank == 0:
            extra = {"embeddings": config["serving_uri"], "ps_rows": tables.serving_snapshot(config["serving_uri"])}
    finally:
        if tables is not None:
            tables.close()
    if ctx.rank != 0:
        return {}
    return {"fit": res, "world_size": ctx.world_size, "pid": os.getpid(), **extra}
