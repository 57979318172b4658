"""RankMixer (spec §3): multi-head token mixing (H = T) + per-token GELU FFN, post-LN by default.

Legend: B batch (candidate rows), U user rows, T tokens (= H heads), Tu user tokens, Tg = T - Tu, D width,
S = D/T slice width.

post (paper Eq. 1, 5): S = LN(Mix(X) + X);  X' = LN(PFFN(S) + S)
pre  (option):         S = X + Mix(LN(X));  X' = S + PFFN(LN(S))
PFFN is the per-token GELU FFN with hidden k*D, or the ReLU-routed DTSI MoE (`moe:`).

UG-Sep (spec §5.3): mixed token h = concat_t x_t^(h); for a user position h < Tu the candidate slices are
zeroed, so user outputs read user tokens only (residual, LN and the per-token FFN are per position). The
user path runs FFN banks [0, Tu) on U rows, the candidate path banks [Tu, T) on B rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.model import NormPosition

from .mixing import mix
from .relu_moe import ReLURoutedMoE
from .token_layers import PerTokenFFN, make_norm
from .token_model import TokenModel
from .ugsep_ops import ffn_banks


class RankMixerBlock(nn.Module):
    def __init__(self, cfg, n_tokens: int, n_user_tokens: int = 0):
        super().__init__()
        D = cfg.d_model
        assert D % n_tokens == 0, (D, n_tokens)
        self.T, self.Tu, self.S, self.post = n_tokens, n_user_tokens, D // n_tokens, cfg.norm_position is NormPosition.post
        self.norm1, self.norm2 = make_norm(cfg.norm, D), make_norm(cfg.norm, D)
        hidden = cfg.hidden()
        self.ffn = ReLURoutedMoE(n_tokens, D, hidden, cfg.moe, cfg.ffn_bias) if cfg.moe is not None \
            else PerTokenFFN(n_tokens, D, hidden, cfg.ffn_bias)

    def _pffn(self, x_BTD: torch.Tensor, losses: list[torch.Tensor] | None) -> torch.Tensor:
        if not isinstance(self.ffn, ReLURoutedMoE):
            return self.ffn(x_BTD)
        y, reg = self.ffn(x_BTD)
        if reg is not None and losses is not None:
            losses.append(reg)
        return y

    def forward(self, x_BTD: torch.Tensor, losses: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Full path: every token, no mask. The ReLU MoE's routing regulariser is appended to `losses`."""
        if self.post:
            s_BTD = self.norm1(mix(x_BTD, self.T) + x_BTD)
            return self.norm2(self._pffn(s_BTD, losses) + s_BTD)
        s_BTD = x_BTD + mix(self.norm1(x_BTD), self.T)
        return s_BTD + self._pffn(self.norm2(s_BTD), losses)

    def _tail(self, x: torch.Tensor, m: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The block after Mix, on token positions [lo, hi) (FFN banks of the same range)."""
        if self.post:
            s = self.norm1(m + x)
            return self.norm2(ffn_banks(self.ffn, s, lo, hi) + s)
        s = x + m
        return s + ffn_banks(self.ffn, self.norm2(s), lo, hi)

    def user_path(self, x_UTD: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        """User tokens -> next user tokens, and the user tokens' Mix input (U, Tu, D) for the candidate path."""
        U, T, Tu, S = x_UTD.shape[0], self.T, self.Tu, self.S
        src_UTD = x_UTD if self.post else self.norm1(x_UTD)
        m_UTS = src_UTD.reshape(U, Tu, T, S)[:, :, :Tu].transpose(1, 2)      # user heads, user slices
        m_UTD = F.pad(m_UTS, (0, 0, 0, T - Tu)).reshape(U, Tu, T * S)        # zeros where candidates were
        return self._tail(x_UTD, m_UTD, 0, Tu), (src_UTD,)

    def candidate_path(self, xg_BTD: torch.Tensor, user: tuple[torch.Tensor], ic: nn.Module | None) -> torch.Tensor:
        """Candidate tokens (B, Tg, D) -> next ones; `user` is `user_path`'s cache gathered per candidate row."""
        T, Tu = self.T, self.Tu
        src_BTD = torch.cat([user[0], xg_BTD if self.post else self.norm1(xg_BTD)], 1)
        m_BTM = mix(src_BTD, T)
        mg_BGM = m_BTM[:, Tu:]
        if ic is not None:
            mg_BGM = mg_BGM + ic(m_BTM[:, :Tu], src_BTD[:, Tu:])
        return self._tail(xg_BTD, mg_BGM, Tu, T)


class RankMixer(TokenModel):
    def __init__(self, cfg, schema, lookup=None):
        super().__init__(cfg, schema, lookup, lambda T, H, Tu: RankMixerBlock(cfg, T, Tu))

    def extra_metrics(self) -> dict[str, float]:
        ratios = [b.ffn.last_active_ratio for b in self.blocks if isinstance(b.ffn, ReLURoutedMoE)]
        ratios = [r for r in ratios if r is not None]
        return {"moe_active_ratio": sum(ratios) / len(ratios)} if ratios else {}
