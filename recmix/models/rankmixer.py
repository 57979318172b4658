"""RankMixer (spec §3): multi-head token mixing (H = T) + per-token GELU FFN, post-LN by default.

Legend: B batch, T tokens (= H heads), D width, K tasks.

post (paper Eq. 1, 5): S = LN(Mix(X) + X);  X' = LN(PFFN(S) + S)
pre  (option):         S = X + Mix(LN(X));  X' = S + PFFN(LN(S))
PFFN is the per-token GELU FFN with hidden k*D, or the ReLU-routed DTSI MoE (`moe:`).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelOutput, RankingModel, TaskHeads
from .mixing import mix
from .token_layers import PerTokenFFN, make_norm
from .relu_moe import ReLURoutedMoE
from .tokenizers import build_tokenizer


class RankMixerBlock(nn.Module):
    def __init__(self, cfg, n_tokens: int):
        super().__init__()
        D = cfg.d_model
        self.T, self.post = n_tokens, cfg.norm_position.value == "post"
        self.norm1, self.norm2 = make_norm(cfg.norm.value, D), make_norm(cfg.norm.value, D)
        hidden = cfg.hidden()
        self.ffn = ReLURoutedMoE(n_tokens, D, hidden, cfg.moe, cfg.ffn_bias) if cfg.moe is not None \
            else PerTokenFFN(n_tokens, D, hidden, cfg.ffn_bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.post:
            s_BTD = self.norm1(mix(x_BTD, self.T) + x_BTD)
            return self.norm2(self.ffn(s_BTD) + s_BTD)
        s_BTD = x_BTD + mix(self.norm1(x_BTD), self.T)
        return s_BTD + self.ffn(self.norm2(s_BTD))


class RankMixer(RankingModel):
    def __init__(self, cfg, schema, lookup=None):
        super().__init__(schema, cfg.embedding, lookup)
        self.tokenizer = build_tokenizer(cfg, schema, self.encoder.widths)
        T = self.tokenizer.n_tokens
        if cfg.resolved_heads(T) != T or cfg.d_model % T:
            raise ValueError(f"RankMixer needs n_heads == n_tokens ({T}) dividing d_model ({cfg.d_model})")
        self.n_tokens = T
        self.blocks = nn.ModuleList([RankMixerBlock(cfg, T) for _ in range(cfg.n_layers)])
        self.heads = TaskHeads(cfg.d_model, len(self.label_names), cfg.head_hidden)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x_BTD = self.tokenizer(self.encoder(batch))
        for blk in self.blocks:
            x_BTD = blk(x_BTD)
        regs = [b.ffn.last_reg for b in self.blocks if isinstance(b.ffn, ReLURoutedMoE) and self.training]
        return ModelOutput(self.heads(x_BTD.mean(1)), [], sum(regs) if regs else None)

    def extra_metrics(self) -> dict[str, float]:
        ratios = [b.ffn.last_active_ratio for b in self.blocks if isinstance(b.ffn, ReLURoutedMoE)]
        ratios = [r for r in ratios if r is not None]
        return {"moe_active_ratio": sum(ratios) / len(ratios)} if ratios else {}
