"""What TokenMixer-Large and RankMixer share: tokenizer(s) -> residual stack of blocks -> mean-pooled
read-out, and UG-Sep as a mode of that stack (spec models.md §4-5).

Legend: B candidate rows, U unique users, T tokens, Tu user tokens, H heads, Cu = H*Tu/T user heads,
D token width, K tasks.

Stack (`run_stack`, the one place the inter-layer residual lives): x_l = step_l(x_{l-1}), plus x_{l-g}
when the gap g > 0, l % g == 0 and l < L (x_0 = tokenizer output). Read-out: task heads on the mean over
all T tokens of x_L; aux towers on the mean of x_l for their layers (deep supervision: extra BCE terms;
logit fusion: added to the logits).

UG-Sep (`ugsep:` present, Algorithm 1 of the paper): the first Tu tokens are user tokens, built from the
user-side features only and, by the blocks' masks, candidate-free at every layer. The same stack runs
  encode_user(user rows)  -> UserState: per layer the user tokens and each block's `user_path` cache
  score(state, candidate rows, user_index) -> the candidate tokens via `candidate_path`, read out over
                             [user tokens of that row's user, candidate tokens]
  forward(batch)          -> the same, deduplicating the batch's users first (`user_aggregation`).
With user_tokens 0 the candidate side holds every token and the blocks run unmasked (their `forward`).
Per candidate, F1/F2 work scales by (1 - rho) + rho / C with rho = Cu / H = Tu / T.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from recmix.platform.specs.model import AuxLossConfig, AuxMode, GlobalToken
from recmix.platform.specs.ugsep import GlobalTokenSide, ICMode, UserAggregation

from .base import ModelOutput, RankingModel, TaskHeads
from .derived_registry import build_derived
from .tokenizers import build_tokenizer
from .ugsep import SideTokenizer, UserState, concat, rows, split_features, unique_users
from .ugsep_ic import InformationCompensation


def run_stack(x_0: torch.Tensor, steps: Sequence[Callable[[torch.Tensor], torch.Tensor]], gap: int) -> list[torch.Tensor]:
    """[x_0, x_1, ..., x_L]: each step, plus the inter-layer residual."""
    xs = [x_0]
    L = len(steps)
    for l, step in enumerate(steps, start=1):
        x = step(xs[-1])
        if gap and l % gap == 0 and l < L:
            x = x + xs[l - gap]
        xs.append(x)
    return xs


class TokenModel(RankingModel):
    """`make_block(T, H, Tu)` builds one block with `forward(x, losses)`, `user_path`, `candidate_path`."""

    def __init__(self, cfg, schema, lookup, make_block: Callable[[int, int, int], nn.Module], gap: int = 0,
                 aux_loss: AuxLossConfig | None = None, aux_layers: Sequence[int] = ()):
        super().__init__(schema, cfg.embedding, lookup, build_derived(cfg, schema))
        widths = self.encoder.widths
        self.ug = cfg.ugsep
        if self.ug is None:
            self.tokenizer = build_tokenizer(cfg, schema, widths, self.encoder.derived)
            T, Tu = self.tokenizer.n_tokens, 0
            if cfg.n_tokens is None:   # T came from the schema: the config could not check it
                cfg.check_tokens(T)
        else:
            T = cfg.n_tokens
            Tu = self.ug.n_user_tokens(T)
            sp = split_features(schema, self.encoder, Tu > 0)
            self.user_names, self.cand_names, self.user_encoder, self.cand_encoder = \
                sp.user_names, sp.cand_names, sp.user_encoder, sp.cand_encoder
            self.user_feats, self.cand_feats, self.ctx_cols = sp.user_feats, sp.cand_feats, sp.ctx_cols
            glob = getattr(cfg, "global_token", None) is GlobalToken.mlp
            user_side = self.ug.global_token_side is GlobalTokenSide.user
            self.user_tokenizer = SideTokenizer(self.user_feats, widths, cfg.d_model, Tu, glob and user_side) if Tu else None
            self.cand_tokenizer = SideTokenizer(self.cand_feats, widths, cfg.d_model, T - Tu, glob and (not user_side or not Tu),
                                                sum(widths[n] for n in self.user_feats))
        H = cfg.resolved_heads(T)
        self.T, self.Tu, self.H, self.Cu, self.D = T, Tu, H, H * Tu // T, cfg.d_model
        self.n_tokens, self.n_heads = T, H
        self.blocks = nn.ModuleList([make_block(T, H, Tu) for _ in range(cfg.n_layers)])
        self.ic = nn.ModuleList([InformationCompensation(self.ug, T, Tu, H, self.Cu, self.D) for _ in range(cfg.n_layers)]) \
            if self.Cu and self.ug.ic_mode is not ICMode.none else None
        self.gap = gap
        self.aux_mode = aux_loss.mode if aux_loss is not None else AuxMode.off
        self.aux_weight = aux_loss.weight if self.aux_mode is AuxMode.deep_supervision else 0.0
        K = len(self.label_names)
        self.aux_towers = nn.ModuleDict({str(l): TaskHeads(self.D, K, cfg.head_hidden) for l in aux_layers})
        self.heads = TaskHeads(self.D, K, cfg.head_hidden)

    # --- full path: every token through every bank ----------------------------------------------------

    def backbone(self, x_BTD: torch.Tensor, losses: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """[x_0, ..., x_L] of the unmasked blocks; routing losses are appended to `losses`."""
        return run_stack(x_BTD, [lambda x, b=blk: b(x, losses) for blk in self.blocks], self.gap)

    def _full(self, x_BTD: torch.Tensor) -> ModelOutput:
        losses: list[torch.Tensor] = []
        xs = self.backbone(x_BTD, losses)
        return self._readout(lambda l: xs[l].mean(1), sum(losses) if losses else None)

    def _readout(self, pooled: Callable[[int], torch.Tensor], extra_loss: torch.Tensor | None) -> ModelOutput:
        L = len(self.blocks)
        aux = [self.aux_towers[str(l)](pooled(l)) for l in range(1, L + 1) if str(l) in self.aux_towers]
        logits_BK = self.heads(pooled(L))
        if self.aux_mode is AuxMode.logit_fusion:
            logits_BK = logits_BK + sum(aux)
            aux = []
        return ModelOutput(logits_BK, aux, extra_loss)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        return self.with_derived_loss(self._forward(batch))

    def _forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        if self.ug is None:
            return self._full(self.tokenizer(self.encoder(batch)))
        cands = {n: batch[n] for n in self.cand_names}
        if not self.Tu:
            return self.score(None, cands, torch.arange(rows(batch, self.cand_names), device=_device(batch)))
        if self.ug.user_aggregation is UserAggregation.dedup:
            first_U, user_index = unique_users(batch, self.user_names)
            users = {n: batch[n][first_U] for n in self.user_names}
        else:
            user_index = torch.arange(rows(batch, self.cand_names + self.user_names), device=_device(batch))
            users = {n: batch[n] for n in self.user_names}
        return self.score(self.encode_user(users), cands, user_index)

    # --- UG-Sep split execution -----------------------------------------------------------------------

    def split_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        return {n: batch[n] for n in self.user_names}, {n: batch[n] for n in self.cand_names}

    def encode_user(self, user_batch: dict[str, torch.Tensor]) -> UserState:
        """Once per unique user: the user tokens of every layer and what the candidate path reuses."""
        if self.ug is None or not self.Tu:
            raise ValueError("this model has no user tokens (no ugsep, or ugsep.user_tokens 0): score with forward()")
        f_UW = concat(self.user_encoder(user_batch), self.user_feats)
        state = self.user_stack(f_UW, self.user_tokenizer(f_UW))
        state.raw = {c: user_batch[c] for c in self.ctx_cols}
        return state

    def user_stack(self, f_UW: torch.Tensor, x_UTD: torch.Tensor) -> UserState:
        """The blocks' user paths on user tokens x_UTD (the user tokenizer's output for features f_UW)."""
        caches: list[tuple[torch.Tensor, ...]] = []

        def user_step(blk):
            def step(x_UTD):
                x_UTD, cache = blk.user_path(x_UTD)
                caches.append(cache)
                return x_UTD
            return step

        xs = run_stack(x_UTD, [user_step(blk) for blk in self.blocks], self.gap)
        return UserState(f_UW, xs, caches)

    def score(self, state: UserState | None, cand_batch: dict[str, torch.Tensor], user_index: torch.Tensor) -> ModelOutput:
        """Per candidate row, reusing the user state of user `user_index[row]`."""
        if self.ug is None:
            raise ValueError("score needs a model with ugsep: use forward()")
        Tu = self.Tu
        if Tu and user_index.numel() and (int(user_index.min()) < 0 or int(user_index.max()) >= state.n_users):
            raise ValueError(f"user_index must lie in [0, {state.n_users}), got [{int(user_index.min())}, {int(user_index.max())}]")
        extra = state.f_U[user_index] if Tu and self.cand_tokenizer.global_mlp is not None else None
        if self.ctx_cols:
            cand_batch = cand_batch | {c: state.raw[c][user_index] for c in self.ctx_cols}
        xg_BTD = self.cand_tokenizer(concat(self.cand_encoder(cand_batch), self.cand_feats), extra)
        if not Tu:
            return self._full(xg_BTD)
        xs = self.candidate_stack(state, xg_BTD, user_index)
        return self._readout(lambda l: torch.cat([state.x_U[l][user_index], xs[l]], 1).mean(1), None)

    def candidate_stack(self, state: UserState, xg_BTD: torch.Tensor, user_index: torch.Tensor,
                        with_ic: bool = True) -> list[torch.Tensor]:
        """[x_0, ..., x_L] of the candidate tokens through the blocks' candidate paths."""
        def cand_step(l):
            ic = self.ic[l] if self.ic is not None and with_ic else None
            return lambda x: self.blocks[l].candidate_path(x, tuple(t[user_index] for t in state.per_layer[l]), ic)

        return run_stack(xg_BTD, [cand_step(l) for l in range(len(self.blocks))], self.gap)


def _device(batch: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(batch.values())).device
