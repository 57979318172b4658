"""UG-Sep on the RankMixer backbone (spec models.md §5.3): H = T, the mask applied after Mix.

Legend: B candidate rows, U unique users, T tokens (= H heads), Tu user tokens, Tg = T - Tu, D width,
S = D/T slice width.

post-LN block: S = LN1(Mix(X) + X); X' = LN2(PFFN(S) + S). Mixed token h = concat_t x_t^(h); for a user
position h < Tu the candidate slices are zeroed, so user outputs read user tokens only (residual, LN and
the per-token FFN are per position). Pre-LN (`norm_position: pre`) mixes LN1(X) the same way.
Information Compensation adds the deleted slices back into candidate mixed tokens (ugsep_ic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, TaskHeads
from .mixing import mix
from .rankmixer import RankMixerBlock
from .ugsep import SideTokenizer, UGSepModel, _concat, _rows
from .ugsep_ic import InformationCompensation
from .ugsep_ops import linear_banks


@dataclass
class RMUserState:
    f_U: torch.Tensor          # (U, W) user feature vectors (unused by RankMixer; kept for a common API)
    x_U: list[torch.Tensor]    # (U, Tu, D) user tokens entering layer l; x_U[L] = last output

    @property
    def n_users(self) -> int:
        return self.x_U[0].shape[0]


def ffn_banks(ffn, x_BPD: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    if hi == lo:
        return x_BPD[:, :0]
    return linear_banks(ffn.w_out, F.gelu(linear_banks(ffn.w_in, x_BPD, lo, hi)), lo, hi)


class UGSepRankMixer(UGSepModel):
    def __init__(self, cfg, ug, schema, lookup=None):
        super().__init__(schema, cfg.embedding, lookup)
        T, D = cfg.n_tokens, cfg.d_model
        if D % T:
            raise ValueError(f"RankMixer needs n_tokens ({T}) dividing d_model ({D})")
        Tu = ug.user_tokens(T)
        self.T, self.Tu, self.H, self.Cu, self.D, self.ug = T, Tu, T, Tu, D, ug
        self.post = cfg.norm_position.value == "post"
        self._partition(schema, Tu)
        widths = self.encoder.widths
        self.user_tokenizer = SideTokenizer(self.user_names, widths, D, Tu, False) if Tu else None
        self.cand_tokenizer = SideTokenizer(self.cand_names, widths, D, T - Tu, False)
        self.blocks = nn.ModuleList([RankMixerBlock(cfg, T) for _ in range(cfg.n_layers)])
        self.ic = nn.ModuleList([InformationCompensation(ug, T, Tu, T, Tu, D) for _ in range(cfg.n_layers)]) \
            if ug.ic_mode.value != "none" and Tu else None
        self.heads = TaskHeads(D, len(self.label_names), cfg.head_hidden)

    def encode_user(self, user_batch: dict[str, torch.Tensor]) -> RMUserState:
        if not self.Tu:
            raise ValueError("this UG-Sep model has no user tokens (n_user_tokens 0): score with forward()")
        U, T, Tu, S = _rows(user_batch, self.user_names), self.T, self.Tu, self.D // self.T
        f_UW = _concat(self.user_encoder(user_batch), self.user_names)
        x = self.user_tokenizer(f_UW)
        xs = [x]
        for blk in self.blocks:
            src = x if self.post else blk.norm1(x)
            m_UTS = src.reshape(U, Tu, T, S)[:, :, :Tu].transpose(1, 2)        # user heads, user slices
            m_UTD = F.pad(m_UTS, (0, 0, 0, T - Tu)).reshape(U, Tu, T * S)      # zeros where candidates were
            x = self._block_tail(blk, x, m_UTD, 0, Tu)
            xs.append(x)
        return RMUserState(f_UW, xs)

    def _block_tail(self, blk, x, m, lo, hi):
        if self.post:
            s = blk.norm1(m + x)
            return blk.norm2(ffn_banks(blk.ffn, s, lo, hi) + s)
        s = x + m
        return s + ffn_banks(blk.ffn, blk.norm2(s), lo, hi)

    def score(self, state, cand_batch: dict[str, torch.Tensor], user_index: torch.Tensor) -> ModelOutput:
        T, Tu = self.T, self.Tu
        xg = self.cand_tokenizer(_concat(self.cand_encoder(cand_batch), self.cand_names))
        for l, blk in enumerate(self.blocks):
            x_BTD = torch.cat([state.x_U[l][user_index], xg], 1) if Tu else xg
            src = x_BTD if self.post else blk.norm1(x_BTD)
            m_BTM = mix(src, T)
            mg = m_BTM[:, Tu:]
            if self.ic is not None:
                mg = mg + self.ic[l](m_BTM[:, :Tu], src[:, Tu:])
            xg = self._block_tail(blk, xg, mg, Tu, T)
        pooled = torch.cat([state.x_U[-1][user_index], xg], 1).mean(1) if Tu else xg.mean(1)
        return ModelOutput(self.heads(pooled), [], None)
