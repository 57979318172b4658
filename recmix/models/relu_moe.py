"""RankMixer's ReLU-routed per-token MoE with DTSI (dense-training / sparse-inference), spec §3.4.

Legend: B batch, T tokens, D width, E experts per token (N_e), G = T*E expert banks (bank t*E + e).

Gates G = ReLU(h(s)); v_t = sum_e G_{t,e} e_{t,e}(s_t). Training computes every expert (dense training);
eval computes only experts with G > 0 (optionally the top `max_active_infer`) through the grouped dispatch.
DTSI couplings (how h_infer learns):
  mixed_forward (default): training gates (1-beta)*ReLU(h_train) + beta*ReLU(h_infer): h_infer gets task
                           gradient through the mix, and the L1 term lambda * sum G_infer keeps it sparse
  distill:   training uses h_train; h_infer regresses to detached h_train gates (MSE) + L1
  l1_only:   literal paper text: training uses h_train, h_infer only sees L1 (collapses; experimental)
  off:       one router for both; L1 on it
lambda follows ReMoE (lambda *= step^sign(target_sparsity - sparsity)) or stays fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.model import DTSICoupling, LambdaRule

from .moe import TokenRouter, grouped_experts
from .token_layers import PerTokenFFN


class ReLURoutedMoE(nn.Module):
    def __init__(self, n_tokens: int, d: int, hidden: int, cfg, bias: bool = True):
        super().__init__()
        E = cfg.n_experts
        self.T, self.E = n_tokens, E
        eh = hidden if cfg.expert_hidden == "full" else hidden // E
        self.experts = PerTokenFFN(n_tokens * E, d, eh, bias)
        # ReLU routers need a bias: without one, ReLU(Wx) is active on half of any symmetric input, whatever L1 does.
        self.h_train = TokenRouter(n_tokens, d, E, bias=True)
        self.h_infer = TokenRouter(n_tokens, d, E, bias=True) if cfg.dtsi is not DTSICoupling.off else None
        self.coupling, self.beta = cfg.dtsi, cfg.beta
        self.target_sparsity = 1.0 - cfg.target_active_ratio
        self.rule, self.step = cfg.lambda_rule, cfg.lambda_step
        self.max_active = cfg.max_active_infer
        self.register_buffer("lam", torch.tensor(float(cfg.lambda_init)))
        self.last_active_ratio: float | None = None   # metrics only

    def _infer_gates(self, s_BTD: torch.Tensor) -> torch.Tensor:
        return F.relu((self.h_infer or self.h_train)(s_BTD))

    def forward(self, s_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, routing regulariser): the regulariser exists in training only."""
        if self.training:
            return self._dense_train(s_BTD)
        g_BTE = self._infer_gates(s_BTD)
        if self.max_active is not None and self.max_active < self.E:
            kth_BT1 = g_BTE.topk(self.max_active, dim=-1).values[..., -1:]
            g_BTE = torch.where(g_BTE >= kth_BT1, g_BTE, torch.zeros_like(g_BTE))
        self.last_active_ratio = float((g_BTE > 0).float().mean())
        b, t, e = torch.nonzero(g_BTE > 0, as_tuple=True)
        return grouped_experts(s_BTD, t * self.E + e, b, t, g_BTE[b, t, e], self.experts), None

    def _dense_train(self, s_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = s_BTD.shape
        g_train = F.relu(self.h_train(s_BTD))
        g_infer = self._infer_gates(s_BTD)
        if self.coupling is DTSICoupling.mixed_forward:
            g_BTE = (1 - self.beta) * g_train + self.beta * g_infer
        else:
            g_BTE = g_train
        reg = float(self.lam) * g_infer.sum((1, 2)).mean()
        if self.coupling is DTSICoupling.distill:
            reg = reg + F.mse_loss(g_infer, g_train.detach())
        with torch.no_grad():
            ratio = float((g_infer > 0).float().mean())
            self.last_active_ratio = ratio
            if self.rule is LambdaRule.remoe:
                sign = (self.target_sparsity > 1.0 - ratio) - (self.target_sparsity < 1.0 - ratio)
                self.lam.mul_(self.step ** sign)
        xrep_BGD = s_BTD.unsqueeze(2).expand(B, T, self.E, D).reshape(B, T * self.E, D)
        out_BTED = self.experts(xrep_BGD).reshape(B, T, self.E, D)
        return (out_BTED * g_BTE.unsqueeze(-1)).sum(2), reg
