"""Single-process training loop: `train_step`, `evaluate`, and `fit` with early stopping on valid AUC.

`train_step(model, batch, optimizer) -> dict` is the unit a distributed trainer calls per batch; `fit`
owns epochs, shuffling, early stopping and the test evaluation (test is scored once, with the best
epoch's weights).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from recmix.models.base import RankingModel

from .data import SplitArrays
from .metrics import auc, logloss

PROGRESS_S = 10.0   # seconds between progress lines within an epoch


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    name = cfg.name.value
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (known: adagrad, adamw)")


def train_step(model: RankingModel, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """One forward/backward/update; returns the loss parts (floats) and model statistics of this batch."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    loss, parts = model.loss(out, batch["labels"])
    loss.backward()
    optimizer.step()
    parts.update(model.extra_metrics())
    return parts


@torch.no_grad()
def predict(model: RankingModel, data: SplitArrays, batch_size: int) -> np.ndarray:
    """Probabilities (N, K) from the serving logits (aux towers ignored)."""
    model.eval()
    outs = [torch.sigmoid(model(b).logits_BK).numpy() for b in data.batches(batch_size)]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, data.labels.shape[1]), np.float32)


def evaluate(model: RankingModel, data: SplitArrays, batch_size: int, warm_users: np.ndarray | None = None) -> dict:
    """AUC and logloss per task (task 0 unprefixed); with `warm_users`, AUC on warm and cold users' rows."""
    p = predict(model, data, batch_size)
    out: dict = {"rows": len(data)}
    for k in range(data.labels.shape[1]):
        pre = "" if k == 0 else f"task{k}_"
        y = data.labels[:, k]
        out[pre + "auc"] = auc(y, p[:, k])
        out[pre + "logloss"] = logloss(y, p[:, k])
        if warm_users is not None and k == 0:
            warm = np.isin(data.user_key, warm_users)
            out["auc_warm"], out["auc_cold"] = auc(y[warm], p[warm, 0]), auc(y[~warm], p[~warm, 0])
            out["rows_warm"], out["rows_cold"] = int(warm.sum()), int((~warm).sum())
    out["_probs"] = p
    return out


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    valid: dict                 # metrics of the best epoch's weights (evaluate's keys)
    test: dict
    history: list[dict]         # one record per epoch
    train_seconds: float
    train_samples_per_s: float
    test_probs: np.ndarray      # (N_test, K) probabilities of the best epoch's weights


def fit(model: RankingModel, train: SplitArrays, valid: SplitArrays, test: SplitArrays, *, optimizer: torch.optim.Optimizer,
        batch_size: int, eval_batch_size: int, epochs: int, patience: int, seed: int,
        log: Callable[[str], None] = print, snapshot: Callable[[int], None] | None = None,
        restore: Callable[[int], None] | None = None, progress_s: float = PROGRESS_S) -> FitResult:
    """Stops after `patience` epochs in a row without a better valid AUC. Logs one progress line about
    every `progress_s` seconds of an epoch. `snapshot(epoch)` / `restore(epoch)` keep state outside the
    model's state_dict (parameter-server rows) in step with the best epoch's dense weights."""
    rng = np.random.default_rng(seed)
    warm_users = np.unique(train.user_key)
    best_auc, best_state, best_epoch, bad = -1.0, None, 0, 0
    history = []
    t_train, n_seen = 0.0, 0
    n_steps = -(-len(train) // batch_size)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        t_report = t0
        sums: dict[str, float] = {}
        steps = n_epoch = 0
        for batch in train.batches(batch_size, rng):
            parts = train_step(model, batch, optimizer)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            n_epoch += batch["labels"].shape[0]
            now = time.perf_counter()
            if now - t_report >= progress_s and steps < n_steps:
                t_report = now
                log(f"[train] epoch {epoch} step {steps}/{n_steps}: {n_epoch / (now - t0):,.0f} samples/s  "
                    f"loss {sums.get('loss', float('nan')) / steps:.4f}")
        n_seen += n_epoch
        t_train += time.perf_counter() - t0
        val = evaluate(model, valid, eval_batch_size)
        val.pop("_probs")
        rec = {"epoch": epoch, **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()}, "valid_auc": val["auc"],
               "valid_logloss": val["logloss"], "epoch_s": round(time.perf_counter() - t0, 2)}
        history.append(rec)
        log(f"[train] epoch {epoch}: loss {rec.get('train_loss', float('nan')):.4f}  valid auc {val['auc']:.4f}  "
            f"logloss {val['logloss']:.4f}  ({rec['epoch_s']}s)")
        if val["auc"] > best_auc:
            best_auc, best_epoch, bad = val["auc"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if snapshot is not None:
                snapshot(epoch)
        else:
            bad += 1
            if bad >= patience:
                log(f"[train] early stop: no valid AUC gain for {bad} epochs (best {best_auc:.4f} at epoch {best_epoch})")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        if restore is not None and best_epoch != len(history):
            restore(best_epoch)
    val = evaluate(model, valid, eval_batch_size)
    tst = evaluate(model, test, eval_batch_size, warm_users)
    probs = tst.pop("_probs")
    val.pop("_probs")
    return FitResult(best_epoch, len(history), val, tst, history, round(t_train, 2),
                     round(n_seen / max(t_train, 1e-9), 1), probs)
