"""The one training loop: what every Ray Train worker runs (and the quality bench runs in-process).

`fit` owns epochs, checkpoints, resume, early stopping and the test evaluation. It sees the world through a
`Context` (rank, world size, device, report/checkpoint, collectives) and a `Feed` (this rank's train batches
per epoch; this rank's slice of valid and test). Ray Train supplies one (`worker.py`), `LocalContext` the
other; the loop is the same. Evaluation gathers every rank's predictions, in rank order, so the metrics are
those of the whole split; rank 0 computes them and broadcasts, so early stopping is decided once.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import torch

from recmix.models.base import RankingModel

from . import state as ckpt
from .data import SplitArrays
from .metrics import auc, logloss

PROGRESS_S = 10.0   # seconds between progress lines within an epoch
FIGURES_S = 2.0     # seconds between rank 0's figures for the gauges within an epoch (progress.py)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    name = cfg.name.value
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (known: adagrad, adamw)")


def lr_schedule(cfg, total_steps: int) -> Optional[Callable[[int], float]]:
    """step -> learning rate (None: constant). The step counts from the run's start, resumes included, so a
    resumed run continues the same curve."""
    if cfg.schedule.value == "constant":
        return None
    assert cfg.schedule.value == "linear", cfg.schedule
    lr, total = cfg.lr, max(total_steps, 1)
    return lambda step: lr * max(0.0, 1.0 - step / total)


def unwrap(model: torch.nn.Module) -> RankingModel:
    """The RankingModel inside a DDP wrapper (loss, extra_metrics, state_dict live there)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """One forward/backward/update (DDP all-reduces in backward); returns this rank's loss parts and model stats."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    inner = unwrap(model)
    loss, parts = inner.loss(out, batch["labels"])
    loss.backward()
    optimizer.step()
    parts.update(inner.extra_metrics())
    return parts


@torch.no_grad()
def predict(model: torch.nn.Module, data: SplitArrays, batch_size: int, device="cpu", sparse=None) -> np.ndarray:
    """Probabilities (N, K) from the serving logits (aux towers ignored), on the unwrapped module; `sparse`
    opens the parameter-server passes the batches need."""
    m = unwrap(model)
    m.eval()
    batches = data.batches(batch_size)
    if sparse is not None:
        batches = sparse.eval_stream(batches)
    outs = [torch.sigmoid(m({k: v.to(device) for k, v in b.items()}).logits_BK).float().cpu().numpy()
            for b in batches]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, data.labels.shape[1]), np.float32)


def scores(y_NK: np.ndarray, p_NK: np.ndarray, users_N: np.ndarray, warm_users: Optional[np.ndarray]) -> dict:
    """AUC and logloss per task (task 0 unprefixed); with `warm_users`, task-0 AUC on warm and cold users' rows."""
    out: dict = {"rows": int(y_NK.shape[0])}
    for k in range(y_NK.shape[1]):
        pre = "" if k == 0 else f"task{k}_"
        out[pre + "auc"] = auc(y_NK[:, k], p_NK[:, k])
        out[pre + "logloss"] = logloss(y_NK[:, k], p_NK[:, k])
    if warm_users is not None:
        warm = np.isin(users_N, warm_users)
        y, p = y_NK[:, 0], p_NK[:, 0]
        out["auc_warm"], out["auc_cold"] = auc(y[warm], p[warm]), auc(y[~warm], p[~warm])
        out["rows_warm"], out["rows_cold"] = int(warm.sum()), int((~warm).sum())
    return out


class Context(Protocol):
    rank: int
    world_size: int
    device: torch.device
    checkpoints: bool           # False: report() keeps nothing, so no checkpoint is built

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None: ...
    def latest_checkpoint(self) -> Optional[tuple[str, str]]: ...   # (a local copy fit() removes, the stored path), or None
    def gather(self, obj) -> list: ...                  # every rank's obj, in rank order, on every rank
    def broadcast(self, obj): ...                       # rank 0's obj on every rank
    def log(self, line: str) -> None: ...
    def observe(self, figures: dict) -> None: ...       # step, loss, samples/s ... for the metrics (rank 0's count)


@dataclass
class LocalContext:
    """One process, no Ray: the quality bench's way to run the loop."""

    log: Callable[[str], None] = print
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    checkpoints: bool = False

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        pass

    def latest_checkpoint(self) -> Optional[tuple[str, str]]:
        return None

    def gather(self, obj) -> list:
        return [obj]

    def broadcast(self, obj):
        return obj

    def observe(self, figures: dict) -> None:
        pass


class Feed(Protocol):
    steps_per_epoch: int

    def train_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]: ...
    valid: SplitArrays      # this rank's slice
    test: SplitArrays
    warm_users: np.ndarray  # users of the train split (from the dataset)


@dataclass
class ArrayFeed:
    """In-memory splits (world size 1): a fresh permutation per epoch from (seed, epoch)."""

    train: SplitArrays
    valid: SplitArrays
    test: SplitArrays
    batch_size: int
    seed: int
    warm_users: np.ndarray = field(init=False)

    def __post_init__(self):
        self.warm_users = np.unique(self.train.user_key)
        self.steps_per_epoch = -(-len(self.train) // self.batch_size)

    def train_batches(self, epoch: int):
        return self.train.batches(self.batch_size, np.random.default_rng([self.seed, epoch]))


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    valid: dict                 # metrics of the best epoch's weights (scores' keys)
    test: dict
    history: list[dict]         # one record per epoch
    train_seconds: float
    train_samples_per_s: float
    resumed_from_step: int      # 0 for a fresh run
    steps: int                  # optimizer steps in total (this run and the runs it resumed)
    test_probs: np.ndarray = field(repr=False)   # (N_test, K) probabilities of the best epoch's weights
    best_state: dict = field(repr=False, default_factory=dict)   # the best epoch's dense state_dict (CPU)


def evaluate(model, data: SplitArrays, batch_size: int, ctx: Context, warm_users=None, sparse=None) -> tuple[dict, np.ndarray]:
    """Every rank predicts its slice; rank 0 scores the whole split and broadcasts (metrics, probabilities)."""
    parts = ctx.gather((predict(model, data, batch_size, ctx.device, sparse), data.labels, data.user_key))
    res = None
    if ctx.rank == 0:
        p, y, u = (np.concatenate([x[i] for x in parts]) for i in range(3))
        res = (scores(y, p, u, warm_users), p)
    return ctx.broadcast(res)


class Sparse(Protocol):
    """State outside the state_dict (parameter-server rows), kept in step with the dense weights: the best
    epoch's (`snapshot` / `restore`) and each checkpoint's (`save_into` / `load_from`, collective calls).
    `train_stream` / `eval_stream` wrap a batch iterator in the passes it needs; `fresh_pass` is True while the
    batch just yielded opens a pass (every update before it is in the shards: a step checkpoint may go there)."""

    fresh_pass: bool

    def train_stream(self, batches: Iterator) -> Iterator: ...
    def eval_stream(self, batches: Iterator) -> Iterator: ...

    def snapshot(self, epoch: int) -> None: ...
    def restore(self, epoch: int) -> None: ...
    def save_into(self, checkpoint_dir: Optional[str], checkpoint_id: str) -> None: ...
    def load_from(self, checkpoint_dir: str, checkpoint_id: str) -> None: ...


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, feed: Feed, ctx: Context, *, eval_batch_size: int,
        epochs: int, patience: int, every_steps: Optional[int] = None, meta: Optional[dict] = None,
        sparse: Optional[Sparse] = None, progress_s: float = PROGRESS_S,
        schedule: Optional[Callable[[int], float]] = None) -> FitResult:
    """Stops after `patience` epochs in a row without a better valid AUC. `meta` (the dataset version) is
    stored in every checkpoint and checked on resume. `schedule` (`lr_schedule`) sets the learning rate
    before each step."""
    inner = unwrap(model)
    st = ckpt.TrainerState(meta=meta or {})
    best_state = None
    found = ctx.latest_checkpoint()
    if found is not None:
        local, where = found         # messages name the stored checkpoint, not the temp copy removed below
        try:
            st, best_state = ckpt.load(local, inner, optimizer, where)
            ckpt.check_meta(st, meta or {}, where)
            if sparse is not None:
                sparse.load_from(local, f"step-{st.step}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
        ctx.log(f"[train] resuming from step {st.step} (epoch {st.epoch + 1}, {st.step_in_epoch} steps into it)")
    resumed_from = st.step

    def save(metrics: dict) -> None:
        d = ckpt.save(st, inner, optimizer, best_state) if ctx.rank == 0 and ctx.checkpoints else None
        if sparse is not None and ctx.checkpoints:
            sparse.save_into(d, f"step-{st.step}")
        ctx.report({**metrics, "step": st.step, "epoch": st.epoch}, d)

    while st.epoch < epochs and not st.stopped:
        epoch = st.epoch + 1
        t0 = t_report = t_fig = time.perf_counter()
        sums: dict[str, float] = dict(st.sums)
        steps, n_epoch, skip, due = st.step_in_epoch, 0, st.step_in_epoch, False
        stream = feed.train_batches(epoch)
        for batch in (sparse.train_stream(stream) if sparse is not None else stream):
            if skip:        # resumed mid-epoch: the batches before the checkpoint were trained already
                skip -= 1
                continue
            if due and (sparse is None or sparse.fresh_pass):   # a step checkpoint waits for a pass boundary
                due = False
                st.step_in_epoch, st.sums = steps, dict(sums)
                elapsed = time.perf_counter() - t0
                st.samples += n_epoch
                st.train_s += elapsed
                save({"loss": sums.get("loss", 0.0) / max(steps, 1)})
                st.samples -= n_epoch
                st.train_s -= elapsed
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            if schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = schedule(st.step)
            parts = train_step(model, batch, optimizer)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            st.step += 1
            n_epoch += batch["labels"].shape[0] * ctx.world_size
            now = time.perf_counter()
            if every_steps and st.step % every_steps == 0:
                due = True
            if now - t_fig >= FIGURES_S or steps == 1:
                t_fig = now
                ctx.observe({"step": st.step, "epoch": epoch, "loss": sums.get("loss", float("nan")) / steps,
                             "samples_per_s": n_epoch / max(now - t0, 1e-9)})
            if ctx.rank == 0 and now - t_report >= progress_s and steps < feed.steps_per_epoch:
                t_report = now
                ctx.log(f"[train] epoch {epoch} step {steps}/{feed.steps_per_epoch}: {n_epoch / (now - t0):,.0f} samples/s  "
                        f"loss {sums.get('loss', float('nan')) / steps:.4f}")
        trained_s = time.perf_counter() - t0
        st.samples += n_epoch
        st.train_s += trained_s
        val, _ = evaluate(model, feed.valid, eval_batch_size, ctx, sparse=sparse)
        rec = {"epoch": epoch, "step": st.step, **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
               "valid_auc": val["auc"], "valid_logloss": val["logloss"], "epoch_s": round(time.perf_counter() - t0, 2),
               "samples_per_s": round(n_epoch / max(trained_s, 1e-9), 1)}   # training only, evaluation excluded
        st.history.append(rec)
        if ctx.rank == 0:
            ctx.log(f"[train] epoch {epoch}: step {st.step}  loss {rec.get('train_loss', float('nan')):.4f}  valid auc "
                    f"{val['auc']:.4f}  logloss {val['logloss']:.4f}  {rec['samples_per_s']:,.0f} samples/s ({rec['epoch_s']}s)")
        st.epoch, st.step_in_epoch, st.sums = epoch, 0, {}
        if val["auc"] > st.best_auc:
            st.best_auc, st.best_epoch, st.bad = val["auc"], epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in inner.state_dict().items()})
            if sparse is not None:
                sparse.snapshot(epoch)
        else:
            st.bad += 1
            if st.bad >= patience:
                st.stopped = True
                if ctx.rank == 0:
                    ctx.log(f"[train] early stop: no valid AUC gain for {st.bad} epochs "
                            f"(best {st.best_auc:.4f} at epoch {st.best_epoch})")
        save(rec)
    if best_state is not None:
        inner.load_state_dict(best_state)
        if sparse is not None and st.best_epoch != st.epoch:
            sparse.restore(st.best_epoch)
    val, _ = evaluate(model, feed.valid, eval_batch_size, ctx, sparse=sparse)
    tst, probs = evaluate(model, feed.test, eval_batch_size, ctx, feed.warm_users, sparse)
    if ctx.rank == 0:
        t = tst
        ctx.log(f"[train] test auc {t['auc']:.4f} (warm {t.get('auc_warm', float('nan')):.4f}, cold "
                f"{t.get('auc_cold', float('nan')):.4f})  logloss {t['logloss']:.4f}  best epoch {st.best_epoch}")
    return FitResult(st.best_epoch, st.epoch, val, tst, st.history, round(st.train_s, 2),
                     round(st.samples / max(st.train_s, 1e-9), 1), resumed_from, st.step, probs,
                     best_state if best_state is not None else {k: v.detach().cpu() for k, v in inner.state_dict().items()})
