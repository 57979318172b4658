"""TokenMixer-Large (spec §4): pre-norm Mix -> F1 -> Revert -> F2 blocks with per-token SwiGLU / S-P MoE.

Legend: B batch, T tokens, D token width, H heads, M = T*D/H mixed-token width, K tasks.

Residual modes (pre-norm, N = RMSNorm):
  B (default): X' = X + Revert(F1(Mix(N(X))));   X_next = X' + F2(N(X'))
  A:           X' = Revert(Mix(X) + F1(N(Mix(X))));  X_next = X + F2(N(X'))
  C:           X_next = X + F2(N(Revert(F1(N(Mix(X))))))
F1 has H weight banks of width M (mixed space), F2 has T banks of width D. No biases. Inter-layer residual:
after block l, if gap g > 0, l % g == 0 and l < L: X_l += X_{l-g} (X_0 = tokenizer output).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelOutput, RankingModel, TaskHeads
from .mixing import mix, revert
from .moe import SparsePertokenMoE
from .token_layers import PerTokenSwiGLU, make_norm
from .tokenizers import build_tokenizer


def _hidden(mult: float, width: int, what: str) -> int:
    h = mult * width
    if abs(h - round(h)) > 1e-6:
        raise ValueError(f"ffn_mult ({mult}) * {what} width ({width}) must be an integer")
    return int(round(h))


class TokenMixerLargeBlock(nn.Module):
    def __init__(self, cfg, n_tokens: int, n_heads: int):
        super().__init__()
        D = cfg.d_model
        self.T, self.H, self.mode = n_tokens, n_heads, cfg.residual_mode.value
        M = n_tokens * D // n_heads
        self.norm1 = make_norm(cfg.norm.value, M if self.mode == "A" else D)
        self.norm2 = make_norm(cfg.norm.value, D)
        init, scale = cfg.init_dist.value, cfg.down_init_std_scale
        moe = cfg.moe
        use_mixed = moe is not None and moe.positions.value in ("both", "mixed")
        use_token = moe is not None and moe.positions.value in ("both", "token")
        h1, h2 = _hidden(cfg.ffn_mult, M, "mixed-token"), _hidden(cfg.ffn_mult, D, "token")
        self.f1 = SparsePertokenMoE(n_heads, M, h1, moe, init, scale) if use_mixed else PerTokenSwiGLU(n_heads, M, h1, False, init, scale)
        self.f2 = SparsePertokenMoE(n_tokens, D, h2, moe, init, scale) if use_token else PerTokenSwiGLU(n_tokens, D, h2, False, init, scale)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.mode == "B":
            x_BTD = x_BTD + revert(self.f1(mix(self.norm1(x_BTD), self.H)), self.T)
            return x_BTD + self.f2(self.norm2(x_BTD))
        if self.mode == "A":
            m_BHM = mix(x_BTD, self.H)
            xr_BTD = revert(m_BHM + self.f1(self.norm1(m_BHM)), self.T)
            return x_BTD + self.f2(self.norm2(xr_BTD))
        return x_BTD + self.f2(self.norm2(revert(self.f1(mix(self.norm1(x_BTD), self.H)), self.T)))

    def moe_layers(self) -> list[SparsePertokenMoE]:
        return [m for m in (self.f1, self.f2) if isinstance(m, SparsePertokenMoE)]


class TokenMixerLarge(RankingModel):
    def __init__(self, cfg, schema, lookup=None):
        super().__init__(schema, cfg.embedding, lookup)
        self.tokenizer = build_tokenizer(cfg, schema, self.encoder.widths)
        T = self.tokenizer.n_tokens
        H = cfg.resolved_heads(T)
        if cfg.d_model % H:
            raise ValueError(f"n_heads ({H}) must divide d_model ({cfg.d_model})")
        self.n_tokens, self.n_heads = T, H
        self.blocks = nn.ModuleList([TokenMixerLargeBlock(cfg, T, H) for _ in range(cfg.n_layers)])
        self.gap = cfg.inter_residual_gap
        self.aux_mode = cfg.aux_loss.mode.value
        self.aux_weight = cfg.aux_loss.weight if self.aux_mode == "deep_supervision" else 0.0
        K = len(self.label_names)
        self.aux_towers = nn.ModuleDict({str(l): TaskHeads(cfg.d_model, K, cfg.head_hidden) for l in cfg.aux_layers()})
        self.heads = TaskHeads(cfg.d_model, K, cfg.head_hidden)

    def backbone(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks with inter-layer residuals; returns the last output and the aux towers' logits."""
        hist = [x_BTD]
        aux: list[torch.Tensor] = []
        L = len(self.blocks)
        for l, blk in enumerate(self.blocks, start=1):
            x_BTD = blk(x_BTD)
            if self.gap and l % self.gap == 0 and l < L:
                x_BTD = x_BTD + hist[l - self.gap]
            hist.append(x_BTD)
            if str(l) in self.aux_towers:
                aux.append(self.aux_towers[str(l)](x_BTD.mean(1)))
        return x_BTD, aux

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x_BTD = self.tokenizer(self.encoder(batch))
        x_BTD, aux = self.backbone(x_BTD)
        logits_BK = self.heads(x_BTD.mean(1))
        if self.aux_mode == "logit_fusion":
            logits_BK = logits_BK + sum(aux)
            aux = []
        extra = [m.last_balance_loss for b in self.blocks for m in b.moe_layers() if m.last_balance_loss is not None]
        return ModelOutput(logits_BK, aux, sum(extra) if extra else None)

    def extra_metrics(self) -> dict[str, float]:
        """Expert-usage imbalance of the last forward: max over (block, position) of max/mean usage."""
        usages = [m.last_usage_PE for b in self.blocks for m in b.moe_layers() if m.last_usage_PE is not None]
        if not usages:
            return {}
        ratio = max(float((u.max(-1).values / u.mean(-1)).max()) for u in usages)
        return {"moe_max_over_mean_usage": ratio}
