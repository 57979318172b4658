"""UG-Sep pieces both backbones use (spec models.md §5): the user/candidate feature split, per-side
tokenizers, the cached user state and the user dedup. The masked blocks are each backbone's own
(`user_path` / `candidate_path` of TokenMixerLargeBlock and RankMixerBlock); `token_model` runs them.

Legend: B rows, U unique users, T tokens, Tu user tokens, W concatenated feature width, D token width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.data import GroupSide

from .embedding import FeatureEncoder
from .token_layers import PerTokenLinear, mlp


@dataclass
class UserState:
    """What the candidate path reuses. `x_U` has L+1 entries, `per_layer` L (indexed by layer 0..L-1)."""

    f_U: torch.Tensor                       # (U, W) user feature vectors, concatenated (the global token reads them)
    x_U: list[torch.Tensor]                 # (U, Tu, D) user tokens entering layer l (x_U[L] = last output)
    per_layer: list[tuple[torch.Tensor, ...]]  # each block's `user_path` cache, rows = users
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # user columns candidate-side derived features read

    @property
    def n_users(self) -> int:
        return self.x_U[0].shape[0]

    def take(self, index_U: torch.Tensor) -> "UserState":
        """The states of users `index_U` (a slice of a batched state: a cached user, one request's users)."""
        return UserState(self.f_U[index_U], [x[index_U] for x in self.x_U],
                         [tuple(t[index_U] for t in c) for c in self.per_layer],
                         {n: v[index_U] for n, v in self.raw.items()})

    @staticmethod
    def cat(states: "list[UserState]") -> "UserState":
        """Users of several states stacked in order: user u of states[i] becomes row sum(n_users[:i]) + u."""
        assert states and all(len(s.x_U) == len(states[0].x_U) for s in states)
        return UserState(torch.cat([s.f_U for s in states]),
                         [torch.cat(xs) for xs in zip(*(s.x_U for s in states))],
                         [tuple(torch.cat(ts) for ts in zip(*layer)) for layer in zip(*(s.per_layer for s in states))],
                         {n: _cat_padded([s.raw[n] for s in states]) for n in states[0].raw})


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row-concatenate list columns padded to different lengths: pad on the right to the longest
    (-1 for ids, 0 for floats, as the data loader pads)."""
    if parts[0].dim() < 2 or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts)
    L = max(p.shape[1] for p in parts)
    fill = 0.0 if parts[0].is_floating_point() else -1
    return torch.cat([F.pad(p, (0, L - p.shape[1]), value=fill) for p in parts])


class SideTokenizer(nn.Module):
    """One side's features -> that side's tokens: concat, zero-pad, chunk, per-token Linear(d -> D).

    An optional global token takes the first token of its side: an MLP over this side's features, plus,
    on the candidate side, the user features (`extra_width`, passed per row as `extra_BW`).
    """

    def __init__(self, names: list[str], widths: dict[str, int], d_model: int, n_tokens: int, global_token: bool,
                 extra_width: int = 0):
        super().__init__()
        self.names, self.n_tokens = names, n_tokens
        total = sum(widths[n] for n in names)
        self.global_mlp = mlp(extra_width + total, d_model, d_model) if global_token else None
        n_chunk = n_tokens - int(self.global_mlp is not None)
        assert n_chunk > 0 or self.global_mlp is not None, (n_tokens, names)   # each side has >= 1 token
        self.n_chunk = n_chunk
        self.chunk_dim = -(-total // n_chunk) if n_chunk else 0
        self.pad = self.chunk_dim * n_chunk - total
        self.proj = PerTokenLinear(n_chunk, self.chunk_dim, d_model, bias=True) if n_chunk else None

    def forward(self, e_BW: torch.Tensor, extra_BW: torch.Tensor | None = None) -> torch.Tensor:
        """e_BW: this side's feature vectors, concatenated in `names` order."""
        n_rows = e_BW.shape[0]
        toks = []
        if self.global_mlp is not None:
            g_in = e_BW if extra_BW is None else torch.cat([extra_BW, e_BW], -1)
            toks.append(self.global_mlp(g_in).unsqueeze(1))
        if self.proj is not None:
            e_BS = F.pad(e_BW, (0, self.pad))
            toks.append(self.proj(e_BS.reshape(n_rows, self.n_chunk, self.chunk_dim)))
        return torch.cat(toks, 1)


@dataclass
class FeatureSplit:
    """The user/candidate split of a model's inputs. `*_names` are batch columns (schema features), `*_feats`
    the encoder outputs of each side (its columns' features, then its derived features), `ctx_cols` the user
    columns that candidate-side derived features read (kept per user in `UserState.raw`)."""

    user_names: list[str]
    cand_names: list[str]
    user_feats: list[str]
    cand_feats: list[str]
    ctx_cols: list[str]
    user_encoder: FeatureEncoder
    cand_encoder: FeatureEncoder


def split_features(schema, encoder: FeatureEncoder, has_user_tokens: bool) -> FeatureSplit:
    """User features are those of groups with side 'user'; without user tokens every feature is a candidate
    feature. A derived feature takes its group's side; a user-side one may read only user columns."""
    user_groups = {g.name for g in schema.groups if g.side is GroupSide.user} if has_user_tokens else set()
    user_names = [f.name for f in schema.inputs if f.group in user_groups]
    cand_names = [f.name for f in schema.inputs if f.group not in user_groups]
    if has_user_tokens and not user_names:
        raise ValueError("UG-Sep needs at least one token group with side 'user' in the feature schema")
    user_derived = [d for d in encoder.derived if d.group in user_groups]
    cand_derived = [d for d in encoder.derived if d.group not in user_groups]
    for d in user_derived:
        bad = [c for c in d.inputs if c not in user_names]
        if bad:
            raise ValueError(f"derived feature '{d.name}' is on the user side (group '{d.group}') but reads "
                             f"candidate-side columns {bad}: UG-Sep keeps user tokens candidate-free")
    ctx_cols = [c for c in user_names if any(c in d.inputs for d in cand_derived)]
    feat = {f.name: f for f in schema.inputs}

    def sub(names, derived):
        return FeatureEncoder(SimpleNamespace(inputs=[feat[n] for n in names]), encoder.lookup, encoder.seq_pooling, derived)

    return FeatureSplit(user_names, cand_names, user_names + [d.name for d in user_derived],
                        cand_names + [d.name for d in cand_derived], ctx_cols,
                        sub(user_names, user_derived), sub(cand_names, cand_derived))


def rows(batch: dict[str, torch.Tensor], names: list[str]) -> int:
    for n in names:
        if n in batch:
            return int(batch[n].shape[0])
    return int(next(iter(batch.values())).shape[0])


def concat(feats: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([feats[n] for n in names], -1)


def unique_users(batch: dict[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct user-side feature tuple, user_index of every row)."""
    cols = []
    for n in names:
        v = batch[n]
        v = v.reshape(v.shape[0], -1)
        if v.is_floating_point():
            v = v.to(torch.float64).view(torch.int64)
        cols.append(v.to(torch.int64))
    key_BW = torch.cat(cols, 1)
    _, inverse_B = torch.unique(key_BW, dim=0, return_inverse=True)
    n_u = int(inverse_B.max()) + 1 if inverse_B.numel() else 0
    first_U = torch.full((n_u,), key_BW.shape[0], dtype=torch.int64, device=key_BW.device)
    first_U = first_U.scatter_reduce(0, inverse_B, torch.arange(key_BW.shape[0], device=key_BW.device), reduce="amin")
    return first_U, inverse_B
