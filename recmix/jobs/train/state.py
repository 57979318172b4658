"""Training checkpoints: what rank 0 writes at every checkpoint and what a resumed worker reads back.

A checkpoint folder holds `model.pt` (the current dense state_dict), `best.pt` (the best epoch's),
`optimizer.pt`, `rng.pt` (torch's CPU RNG state) - all readable by `torch.load(weights_only=True)` - and
`trainer.json` (epoch, step, best metric, patience count, history, the sizes and sha256 of the other files),
written last: a folder without it, or whose files do not match it, is partial or corrupt and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from recmix.platform.errors import RecmixError

FORMAT = "recmix-train-checkpoint-v1"
TRAINER = "trainer.json"
FILES = ("model.pt", "best.pt", "optimizer.pt", "rng.pt")


@dataclass
class TrainerState:
    epoch: int = 0                # completed epochs
    step: int = 0                 # optimizer steps since the start of the run
    step_in_epoch: int = 0        # > 0: checkpointed mid-epoch, after this many steps of epoch + 1
    best_auc: float = -1.0
    best_epoch: int = 0
    bad: int = 0                  # epochs in a row without a better valid AUC
    stopped: bool = False         # early stopping decided
    samples: int = 0
    train_s: float = 0.0
    sums: dict = field(default_factory=dict)       # running loss sums of the current epoch
    history: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)       # dataset version etc., checked on resume


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(st: TrainerState, model: torch.nn.Module, optimizer: torch.optim.Optimizer, best_state: Optional[dict]) -> str:
    """Write a checkpoint into a fresh temp folder (Ray Train persists it, then the folder may go)."""
    d = tempfile.mkdtemp(prefix="recmix-ckpt-")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(d, "model.pt"))
    torch.save(best_state if best_state is not None else state, os.path.join(d, "best.pt"))
    torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
    torch.save(torch.get_rng_state(), os.path.join(d, "rng.pt"))
    files = {n: {"bytes": os.path.getsize(os.path.join(d, n)), "sha256": _sha(os.path.join(d, n))} for n in FILES}
    doc = {"format": FORMAT, "state": asdict(st), "files": files}
    with open(os.path.join(d, TRAINER), "w") as f:
        json.dump(doc, f, default=float)
    return d


def verify(d: str, where: str) -> dict:
    """trainer.json of a complete checkpoint folder; a RecmixError naming `where` otherwise."""
    hint = "rerun with --restart for a fresh run"
    try:
        with open(os.path.join(d, TRAINER)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise RecmixError(f"checkpoint {where} is partial (no {TRAINER}); {hint}") from None
    except ValueError:
        raise RecmixError(f"checkpoint {where}: {TRAINER} is not valid JSON (truncated?); {hint}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RecmixError(f"checkpoint {where}: {TRAINER} is not a {FORMAT} record; {hint}")
    for name, want in doc["files"].items():
        p = os.path.join(d, name)
        if not os.path.exists(p):
            raise RecmixError(f"checkpoint {where} is partial ({name} is missing); {hint}")
        if os.path.getsize(p) != want["bytes"] or _sha(p) != want["sha256"]:
            raise RecmixError(f"checkpoint {where} is corrupt ({name}: {os.path.getsize(p)} bytes, "
                              f"{want['bytes']} recorded, or a different sha256); {hint}")
    return doc


def load(d: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: Optional[str] = None
         ) -> tuple[TrainerState, dict]:
    """Restore model, optimizer and RNG from a checkpoint folder; returns (trainer state, best state_dict).
    `where` names the checkpoint in errors (its stored path, when `d` is a local copy)."""
    doc = verify(d, where or d)
    dev = next(model.parameters()).device
    model.load_state_dict(torch.load(os.path.join(d, "model.pt"), weights_only=True, map_location=dev))
    optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True, map_location=dev))
    torch.set_rng_state(torch.load(os.path.join(d, "rng.pt"), weights_only=True))
    best = torch.load(os.path.join(d, "best.pt"), weights_only=True)
    return TrainerState(**doc["state"]), best


def check_meta(st: TrainerState, meta: dict, where: str) -> None:
    for key, now in meta.items():
        then = st.meta.get(key)
        if then is not None and then != now:
            raise RecmixError(f"checkpoint {where} belongs to {key} {then!r}, this run has {now!r}; "
                              "rerun with --restart for a fresh run")
