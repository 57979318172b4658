"""TokenMixer-Large (spec §4): pre-norm Mix -> F1 -> Revert -> F2 blocks with per-token SwiGLU / S-P MoE.

Legend: B batch (candidate rows), U user rows, T tokens, Tu user tokens, Tg = T - Tu candidate tokens,
D token width, H heads, Cu = H*Tu/T user heads, S = D/H slice width, M = T*S mixed-token width.

Residual modes (pre-norm, N = RMSNorm):
  B (default): X' = X + Revert(F1(Mix(N(X))));   X_next = X' + F2(N(X'))
  A:           X' = Revert(Mix(X) + F1(N(Mix(X))));  X_next = X + F2(N(X'))
  C:           X_next = X + F2(N(Revert(F1(N(Mix(X))))))
F1 has H weight banks of width M (mixed space), F2 has T banks of width D. No biases. The inter-layer
residual, aux towers and read-out are the shared stack of `token_model`.

UG-Sep (mode B, spec §5.3): user heads h < Cu read user tokens only (the candidate slices of their mixed
token are zero), and a user token t < Tu keeps only the user heads' slices of the Revert update. So the
user path runs on U rows with F1 banks [0, Cu) and F2 banks [0, Tu), and the candidate path on B rows
with banks [Cu, H) and [Tu, T), reading the user path's per-layer norms and F1 outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.model import MoEPositions, ResidualMode

from .mixing import mix, revert
from .moe import SparsePertokenMoE
from .token_layers import PerTokenSwiGLU, make_norm
from .token_model import TokenModel
from .ugsep_ops import swiglu_banks


def _ffn(layer: nn.Module, x: torch.Tensor, losses: list[torch.Tensor] | None) -> torch.Tensor:
    """A pSwiGLU or S-P MoE output; the MoE's balance loss is appended to `losses`."""
    if not isinstance(layer, SparsePertokenMoE):
        return layer(x)
    y, loss = layer(x)
    if loss is not None and losses is not None:
        losses.append(loss)
    return y


class TokenMixerLargeBlock(nn.Module):
    def __init__(self, cfg, n_tokens: int, n_heads: int, n_user_tokens: int = 0):
        super().__init__()
        D = cfg.d_model
        self.T, self.H, self.D, self.mode = n_tokens, n_heads, D, cfg.residual_mode
        self.Tu, self.Cu, self.S = n_user_tokens, n_heads * n_user_tokens // n_tokens, D // n_heads
        assert D % n_heads == 0 and (n_heads * n_user_tokens) % n_tokens == 0, (D, n_tokens, n_heads, n_user_tokens)
        assert not n_user_tokens or self.mode is ResidualMode.B, self.mode
        M = n_tokens * D // n_heads
        self.norm1 = make_norm(cfg.norm, M if self.mode is ResidualMode.A else D)
        self.norm2 = make_norm(cfg.norm, D)
        init, scale = cfg.init_dist, cfg.down_init_std_scale
        h1, h2 = int(round(cfg.ffn_mult * M)), int(round(cfg.ffn_mult * D))
        self.f1 = SparsePertokenMoE(n_heads, M, h1, cfg.moe, init, scale) if cfg.moe_at(MoEPositions.mixed) \
            else PerTokenSwiGLU(n_heads, M, h1, False, init, scale)
        self.f2 = SparsePertokenMoE(n_tokens, D, h2, cfg.moe, init, scale) if cfg.moe_at(MoEPositions.token) \
            else PerTokenSwiGLU(n_tokens, D, h2, False, init, scale)

    def forward(self, x_BTD: torch.Tensor, losses: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Full path: every token, no mask. S-P MoE balance losses are appended to `losses`."""
        if self.mode is ResidualMode.B:
            x_BTD = x_BTD + revert(_ffn(self.f1, mix(self.norm1(x_BTD), self.H), losses), self.T)
            return x_BTD + _ffn(self.f2, self.norm2(x_BTD), losses)
        if self.mode is ResidualMode.A:
            m_BHM = mix(x_BTD, self.H)
            xr_BTD = revert(m_BHM + _ffn(self.f1, self.norm1(m_BHM), losses), self.T)
            return x_BTD + _ffn(self.f2, self.norm2(xr_BTD), losses)
        y_BTD = revert(_ffn(self.f1, mix(self.norm1(x_BTD), self.H), losses), self.T)
        return x_BTD + _ffn(self.f2, self.norm2(y_BTD), losses)

    def user_path(self, x_UTD: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """User tokens -> next user tokens, and what the candidate path reuses: (N1(user tokens) (U, Tu, D),
        the user heads' F1 output (U, Cu, T, S))."""
        U, T, Tu, H, Cu, S = x_UTD.shape[0], self.T, self.Tu, self.H, self.Cu, self.S
        n_UTD = self.norm1(x_UTD)
        m_UCTS = F.pad(n_UTD.reshape(U, Tu, H, S)[:, :, :Cu].transpose(1, 2), (0, 0, 0, T - Tu))
        y_UCTS = swiglu_banks(self.f1, m_UCTS.reshape(U, Cu, T * S), 0, Cu).reshape(U, Cu, T, S)
        upd_UTD = F.pad(y_UCTS[:, :, :Tu].transpose(1, 2), (0, 0, 0, H - Cu)).reshape(U, Tu, self.D)
        x_UTD = x_UTD + upd_UTD
        return x_UTD + swiglu_banks(self.f2, self.norm2(x_UTD), 0, Tu), (n_UTD, y_UCTS)

    def candidate_path(self, xg_BTD: torch.Tensor, user: tuple[torch.Tensor, torch.Tensor], ic: nn.Module | None) -> torch.Tensor:
        """Candidate tokens (B, Tg, D) -> next ones; `user` is `user_path`'s cache gathered per candidate row."""
        B, T, Tu, H, Cu, S = xg_BTD.shape[0], self.T, self.Tu, self.H, self.Cu, self.S
        n_BuD, y_BCTS = user
        n_BTD = torch.cat([n_BuD, self.norm1(xg_BTD)], 1)
        m_BHM = mix(n_BTD, H)
        mg_BGM = m_BHM[:, Cu:]
        if ic is not None:
            mg_BGM = mg_BGM + ic(m_BHM[:, :Cu], n_BTD[:, Tu:])
        yg_BGTS = swiglu_banks(self.f1, mg_BGM, Cu, H).reshape(B, H - Cu, T, S)
        y_BHTS = torch.cat([y_BCTS, yg_BGTS], 1)
        xg_BTD = xg_BTD + y_BHTS[:, :, Tu:].transpose(1, 2).reshape(B, T - Tu, self.D)
        return xg_BTD + swiglu_banks(self.f2, self.norm2(xg_BTD), Tu, T)

    def moe_layers(self) -> list[SparsePertokenMoE]:
        return [m for m in (self.f1, self.f2) if isinstance(m, SparsePertokenMoE)]


class TokenMixerLarge(TokenModel):
    def __init__(self, cfg, schema, lookup=None):
        super().__init__(cfg, schema, lookup, lambda T, H, Tu: TokenMixerLargeBlock(cfg, T, H, Tu),
                         gap=cfg.inter_residual_gap, aux_loss=cfg.aux_loss, aux_layers=cfg.aux_layers())

    def extra_metrics(self) -> dict[str, float]:
        """Expert-usage imbalance of the last forward: max over (block, position) of max/mean usage."""
        usages = [m.last_usage_PE for b in self.blocks for m in b.moe_layers() if m.last_usage_PE is not None]
        if not usages:
            return {}
        ratio = max(float((u.max(-1).values / u.mean(-1)).max()) for u in usages)
        return {"moe_max_over_mean_usage": ratio}
