"""UG-Sep on the TokenMixer-Large backbone (spec models.md §5.2-5.6): user tokens stay candidate-free.

Legend: B candidate rows, U unique users, T tokens, Tu user tokens, Tg = T - Tu candidate tokens,
H heads, Cu user heads, S = D/H slice width, M = T*S mixed-token width, D token width, K tasks.

Per block (residual mode B, pre-norm, N = per-token RMSNorm):
  mixed token h = concat_t N(x_t)^(h). Mask: for a user head h < Cu the slices of candidate tokens are
  zeroed, so user heads read user tokens only. Revert: a user token t < Tu keeps only the slices coming
  from user heads (the candidate heads' updates to it are dropped). F2, norms and the inter-layer residual
  are per token. By induction every user token of every layer is a function of user features only.

Split execution (Algorithm 1 of the paper):
  encode_user(user rows)  -> UserState: per layer the user tokens, their norms, the user heads' F1 output
  score(state, candidate rows, user_index) -> logits, reusing the user state for every candidate
  forward(batch)          -> the same, deduplicating the batch's users first (user-level aggregation)
Per candidate, F1/F2 work scales by (1 - rho) + rho / C with rho = Cu / H = Tu / T (default H = T).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, RankingModel, TaskHeads
from .embedding import FeatureEncoder
from .mixing import mix
from .token_layers import PerTokenLinear, mlp
from .tokenmixer_large import TokenMixerLargeBlock
from .ugsep_ic import InformationCompensation
from .ugsep_ops import swiglu_banks


@dataclass
class UserState:
    """What the candidate path reuses. Lists are indexed by layer 0..L-1 (`x_U` has L+1 entries)."""

    f_U: torch.Tensor           # (U, W) the user features' vectors, concatenated (the global token reads them)
    x_U: list[torch.Tensor]     # (U, Tu, D) user tokens entering layer l (x_U[L] = last output)
    n_U: list[torch.Tensor]     # (U, Tu, D) N1(user tokens) of layer l
    y_U: list[torch.Tensor]     # (U, Cu, T, S) user heads' F1 output of layer l, split into T slices

    @property
    def n_users(self) -> int:
        return self.x_U[0].shape[0]


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
        if n_chunk < 0 or (n_chunk == 0 and total and self.global_mlp is None):
            raise ValueError(f"{n_tokens} tokens cannot hold features {names}")
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


class UGSepModel(RankingModel):
    """What both UG-Sep backbones share: the user/candidate feature split, the full forward with
    user-level aggregation, and `split_batch`. Subclasses implement `encode_user` and `score`."""

    def _partition(self, schema, n_user_tokens: int) -> None:
        """User-side features (groups with side 'user') and candidate-side ones, each with its encoder."""
        user_groups = {g.name for g in schema.groups if g.side.value == "user"} if n_user_tokens else set()
        self.user_names = [f.name for f in schema.inputs if f.group in user_groups]
        self.cand_names = [f.name for f in schema.inputs if f.group not in user_groups]
        if n_user_tokens and not self.user_names:
            raise ValueError("UG-Sep needs at least one token group with side 'user' in the feature schema")
        lk, pool = self.encoder.lookup, self.encoder.seq_pooling
        feat = {f.name: f for f in schema.inputs}
        self.user_encoder = FeatureEncoder(SimpleNamespace(inputs=[feat[n] for n in self.user_names]), lk, pool)
        self.cand_encoder = FeatureEncoder(SimpleNamespace(inputs=[feat[n] for n in self.cand_names]), lk, pool)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        B = _rows(batch, self.cand_names + self.user_names)
        if self.Tu and self.ug.train_user_aggregation.value == "on":
            first_U, user_index = unique_users(batch, self.user_names)
        else:
            first_U, user_index = None, torch.arange(B)
        state = None
        if self.Tu:
            state = self.encode_user({n: batch[n] if first_U is None else batch[n][first_U] for n in self.user_names})
        return self.score(state, {n: batch[n] for n in self.cand_names}, user_index)

    def split_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        return {n: batch[n] for n in self.user_names}, {n: batch[n] for n in self.cand_names}


class UGSepTokenMixerLarge(UGSepModel):
    """TokenMixer-Large with UG-Sep masking; `cfg` is a TokenMixerLargeConfig, `ug` its UGSepConfig."""

    def __init__(self, cfg, ug, schema, lookup=None):
        super().__init__(schema, cfg.embedding, lookup)
        if cfg.residual_mode.value != "B":
            raise ValueError(f"UG-Sep is implemented for residual_mode B, got {cfg.residual_mode.value}")
        if cfg.moe is not None:
            raise ValueError("UG-Sep with S-P MoE is not supported yet; remove model.moe or model.ugsep")
        if cfg.n_tokens is None:
            raise ValueError("UG-Sep needs model.n_tokens (user and candidate tokens are chunked per side)")
        T, D = cfg.n_tokens, cfg.d_model
        H = cfg.resolved_heads(T)
        if D % H:
            raise ValueError(f"n_heads ({H}) must divide d_model ({D})")
        Tu = ug.user_tokens(T)
        if (H * Tu) % T:
            raise ValueError(f"user heads H*Tu/T = {H}*{Tu}/{T} must be whole; choose n_heads so that T divides H*Tu")
        self.T, self.Tu, self.H, self.Cu, self.D = T, Tu, H, H * Tu // T, D
        self.ug = ug
        widths = self.encoder.widths
        self._partition(schema, Tu)
        glob = cfg.global_token.value == "mlp"
        g_side = ug.global_token_side.value
        self.user_tokenizer = SideTokenizer(self.user_names, widths, D, Tu, glob and g_side == "u") if Tu else None
        self.cand_tokenizer = SideTokenizer(self.cand_names, widths, D, T - Tu, glob and (g_side == "g" or not Tu),
                                      sum(widths[n] for n in self.user_names))
        self.blocks = nn.ModuleList([TokenMixerLargeBlock(cfg, T, H) for _ in range(cfg.n_layers)])
        self.ic = nn.ModuleList([InformationCompensation(ug, T, Tu, H, self.Cu, D) for _ in range(cfg.n_layers)]) \
            if ug.ic_mode.value != "none" and self.Cu else None
        self.gap = cfg.inter_residual_gap
        self.aux_mode = cfg.aux_loss.mode.value
        self.aux_weight = cfg.aux_loss.weight if self.aux_mode == "deep_supervision" else 0.0
        K = len(self.label_names)
        self.aux_towers = nn.ModuleDict({str(l): TaskHeads(D, K, cfg.head_hidden) for l in cfg.aux_layers()})
        self.heads = TaskHeads(D, K, cfg.head_hidden)

    # --- user path: once per unique user ------------------------------------------------------------

    def encode_user(self, user_batch: dict[str, torch.Tensor]) -> UserState:
        T, Tu, H, Cu, S = self.T, self.Tu, self.H, self.Cu, self.D // self.H
        if not Tu:
            raise ValueError("this UG-Sep model has no user tokens (n_user_tokens 0): score with forward()")
        n_rows = _rows(user_batch, self.user_names)
        f_UW = _concat(self.user_encoder(user_batch), self.user_names)
        x = self.user_tokenizer(f_UW)
        xs, ns, ys = [x], [], []
        for l, blk in enumerate(self.blocks, start=1):
            n_UTD = blk.norm1(x)
            m_UCTS = F.pad(n_UTD.reshape(n_rows, Tu, H, S)[:, :, :Cu].transpose(1, 2), (0, 0, 0, T - Tu))
            y_UCTS = swiglu_banks(blk.f1, m_UCTS.reshape(n_rows, Cu, T * S), 0, Cu).reshape(n_rows, Cu, T, S)
            upd_UTD = F.pad(y_UCTS[:, :, :Tu].transpose(1, 2), (0, 0, 0, H - Cu)).reshape(n_rows, Tu, self.D)
            x = x + upd_UTD
            x = x + swiglu_banks(blk.f2, blk.norm2(x), 0, Tu)
            if self.gap and l % self.gap == 0 and l < len(self.blocks):
                x = x + xs[l - self.gap]
            ns.append(n_UTD)
            ys.append(y_UCTS)
            xs.append(x)
        return UserState(f_UW, xs, ns, ys)

    # --- candidate path: per candidate, reusing the user state ------------------------------------------

    def score(self, state: UserState | None, cand_batch: dict[str, torch.Tensor], user_index: torch.Tensor) -> ModelOutput:
        B = user_index.shape[0]
        T, Tu, H, Cu, S, D = self.T, self.Tu, self.H, self.Cu, self.D // self.H, self.D
        Tg = T - Tu
        if Tu and B and (int(user_index.min()) < 0 or int(user_index.max()) >= state.n_users):
            raise ValueError(f"user_index must lie in [0, {state.n_users}), got [{int(user_index.min())}, {int(user_index.max())}]")
        extra = state.f_U[user_index] if Tu and self.cand_tokenizer.global_mlp is not None else None
        xg = self.cand_tokenizer(_concat(self.cand_encoder(cand_batch), self.cand_names), extra)
        hist_g = [xg]
        aux = []
        for l, blk in enumerate(self.blocks, start=1):
            n_BTD = torch.cat([state.n_U[l - 1][user_index], blk.norm1(xg)], 1) if Tu else blk.norm1(xg)
            m_BHM = mix(n_BTD, H)
            mg_BGM = m_BHM[:, Cu:]
            if self.ic is not None:
                mg_BGM = mg_BGM + self.ic[l - 1](m_BHM[:, :Cu], n_BTD[:, Tu:])
            yg_BGTS = swiglu_banks(blk.f1, mg_BGM, Cu, H).reshape(B, H - Cu, T, S)
            y_BHTS = torch.cat([state.y_U[l - 1][user_index], yg_BGTS], 1) if Cu else yg_BGTS
            xg = xg + y_BHTS[:, :, Tu:].transpose(1, 2).reshape(B, Tg, D)
            xg = xg + swiglu_banks(blk.f2, blk.norm2(xg), Tu, T)
            if self.gap and l % self.gap == 0 and l < len(self.blocks):
                xg = xg + hist_g[l - self.gap]
            hist_g.append(xg)
            if str(l) in self.aux_towers:
                aux.append(self.aux_towers[str(l)](self._pool(state, l, user_index, xg)))
        logits_BK = self.heads(self._pool(state, len(self.blocks), user_index, xg))
        if self.aux_mode == "logit_fusion":
            logits_BK = logits_BK + sum(aux)
            aux = []
        return ModelOutput(logits_BK, aux, None)

    def _pool(self, state: UserState | None, l: int, user_index: torch.Tensor, xg_BTD: torch.Tensor) -> torch.Tensor:
        """Mean over all T tokens of layer l's output (user tokens gathered per candidate)."""
        if not self.Tu:
            return xg_BTD.mean(1)
        return torch.cat([state.x_U[l][user_index], xg_BTD], 1).mean(1)

def _rows(batch: dict[str, torch.Tensor], names: list[str]) -> int:
    for n in names:
        if n in batch:
            return int(batch[n].shape[0])
    return int(next(iter(batch.values())).shape[0])


def _concat(feats: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
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
    first_U = torch.full((n_u,), key_BW.shape[0], dtype=torch.int64)
    first_U = first_U.scatter_reduce(0, inverse_B, torch.arange(key_BW.shape[0]), reduce="amin")
    return first_U, inverse_B


__all__ = ["UGSepModel", "UGSepTokenMixerLarge", "UserState", "unique_users"]
