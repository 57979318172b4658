"""Derived features: per-row vectors that a module computes from raw batch columns (sequence tokens with
their side attributes, target attention, the LMN memory read-out), added to the FeatureEncoder's output
beside the schema's features.

Legend: B rows, W derived width.

A derived feature joins a token group of the feature schema, after that group's own features, so every
model consumes it like a feature: DLRM-MLP concatenates it, the tokenizers put it in its group's token(s)
and UG-Sep puts it on the group's side. Under UG-Sep a user-side derived feature may read only user-side
columns (it is computed once per user on the user path); a candidate-side one may also read user-side
columns (target attention reads the history): `TokenModel.score` hands it those columns per candidate row
from `UserState.raw`.
"""

from __future__ import annotations

import torch
from torch import nn


class DerivedFeature(nn.Module):
    """Subclasses set `name`, `group`, `width`, `inputs` and implement `forward(batch, lookup) -> (B, W)`."""

    name: str
    group: str
    width: int
    inputs: tuple[str, ...]
    tables: dict = {}   # {name: TableSpec} of lookup tables the feature owns (LMN values); never mutated
    fit_columns: tuple[str, ...] = ()   # training-split columns its statistics need (`fit_statistics`); () = none

    def __init__(self):
        super().__init__()
        self._last_loss: torch.Tensor | None = None

    def forward(self, batch: dict[str, torch.Tensor], lookup) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss of the last forward (set `self._last_loss` there), or None."""
        return self._last_loss

    def fit_statistics(self, columns: dict, labels) -> None:  # pragma: no cover - only with fit_columns
        """Fit statistics (buffers) from the training split before training: `columns` maps each of
        `fit_columns` to its ids per row, `labels` holds the first task's label per row."""
        raise NotImplementedError


def fit_columns(model: nn.Module) -> list[str]:
    """The training-split columns the statistics of `model`'s derived features need (empty: nothing to fit)."""
    return sorted({c for m in model.modules() if isinstance(m, DerivedFeature) for c in m.fit_columns})


def fit_derived(model: nn.Module, read) -> None:
    """Fit every derived feature of `model` that has statistics, from the training split. `read(columns)`
    returns ({column: ids per row}, first-task labels per row); it is not called when nothing needs fitting."""
    need = fit_columns(model)
    if not need:
        return
    columns, labels = read(need)
    for m in model.modules():
        if isinstance(m, DerivedFeature) and m.fit_columns:
            m.fit_statistics(columns, labels)


def check_derived(derived: list[DerivedFeature], schema) -> None:
    inputs = {f.name for f in schema.inputs}
    groups = {g.name for g in schema.groups}
    seen: set[str] = set()
    for d in derived:
        if d.name in inputs or d.name in seen:
            raise ValueError(f"derived feature '{d.name}' clashes with a feature of the same name")
        seen.add(d.name)
        if d.group not in groups:
            raise ValueError(f"derived feature '{d.name}': group '{d.group}' is not a group of the feature schema "
                             f"(groups: {', '.join(sorted(groups))})")
        missing = [c for c in d.inputs if c not in inputs]
        if missing:
            raise ValueError(f"derived feature '{d.name}' reads {missing}, which the feature schema does not have")


def derived_tables(derived) -> dict:
    """The lookup tables the derived features own, beside the schema's (a local lookup creates them)."""
    return {n: t for d in derived for n, t in d.tables.items()}


def total_loss(derived) -> torch.Tensor | None:
    losses = [l for l in (d.loss() for d in derived) if l is not None]
    return sum(losses) if losses else None
