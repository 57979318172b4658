"""Sparse-Pertoken MoE (TokenMixer-Large §4.5, Eq. 21) and the grouped expert dispatch it shares.

Legend: B batch, P token positions (T tokens, or H mixed tokens), W token width, E_r routed experts per
position, K_r active routed experts, F expert hidden width, N = B*P*K_r routed assignments,
G = P*E_r expert banks (bank g = p*E_r + e), C rows per bank after padding to the fullest bank.

y_p(x) = alpha * sum_{i in TopK_r} g_{p,i}(x) E_{p,i}(x) + E_p^shared(x),
g = softmax over the E_r routed logits, top-K_r kept and renormalised to sum 1, alpha default E/K.

Expert-split identity (tested): with every routed expert active (K = E), uniform gates (zero router) and
alpha = E_r = E - 1, the MoE equals the dense pSwiGLU whose hidden units are the concatenation of the
routed experts' and the shared expert's hidden units, because down(SiLU(gate x) * up x) is a sum over
hidden units. In general MoE(x) = sum_i (alpha * g_i) E_i(x) + E_shared(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.model import BalanceLoss, InitDist, MoECompute, SharedExpert

from .token_layers import PerTokenSwiGLU


def grouped_experts(x_BPW: torch.Tensor, bank_N: torch.Tensor, row_N: torch.Tensor, pos_N: torch.Tensor,
                    gate_N: torch.Tensor, experts: nn.Module, k_per_row: int | None = None) -> torch.Tensor:
    """Sum over assignments n of gate_n * expert[bank_n](x[row_n, pos_n]), into (B, P, W).

    `experts` maps (C, G, W) -> (C, G, W) with G banks (PerTokenSwiGLU or PerTokenFFN). Assignments are
    ranked within their bank (one argsort) and gathered bank-major into a (G, C, W) buffer, zero rows
    padding the less-used banks, so all experts run as one batched matmul; cost ~ G*C rows instead of B*P*E.
    With `k_per_row` the assignments are in (B, P, K) row-major order and are combined by a reshape+sum
    instead of a scatter-add.
    """
    B, P, W = x_BPW.shape
    G = experts.w_in.n_banks
    N = bank_N.numel()
    if N == 0:
        return x_BPW.new_zeros(B, P, W)
    order = torch.argsort(bank_N)
    counts_G = torch.bincount(bank_N, minlength=G)
    C = int(counts_G.max())
    start_G = torch.cumsum(counts_G, 0) - counts_G
    slot_N = torch.empty_like(bank_N)
    slot_N[order] = torch.arange(N, device=x_BPW.device) - start_G[bank_N[order]]
    # One gather builds the padded buffer: padding slots read an appended zero row (index B*P), so there
    # is no zero-fill + scatter, and the backward is a single index_add.
    src_N = row_N * P + pos_N
    dst_N = bank_N * C + slot_N
    src_GC = torch.full((G * C,), B * P, dtype=torch.long, device=x_BPW.device)
    src_GC[dst_N] = src_N
    x_ext = torch.cat([x_BPW.reshape(B * P, W), x_BPW.new_zeros(1, W)])
    xin_GCW = x_ext.index_select(0, src_GC).reshape(G, C, W)
    # experts take (C, G, W); the transposed view makes the kernel's own transpose a no-op copy-wise
    out_GCW = experts(xin_GCW.transpose(0, 1)).transpose(0, 1)
    vals_NW = out_GCW.reshape(G * C, W).index_select(0, dst_N) * gate_N.unsqueeze(-1)
    if k_per_row is not None:
        return vals_NW.reshape(B, P, k_per_row, W).sum(2)
    return x_BPW.new_zeros(B * P, W).index_add(0, src_N, vals_NW).reshape(B, P, W)


class TokenRouter(nn.Module):
    """Per-position Linear(W -> E) logits. Not a PerTokenLinear: quantizers must leave routers alone."""

    def __init__(self, n_pos: int, width: int, n_experts: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_pos, width, n_experts) * width ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n_pos, n_experts)) if bias else None

    def forward(self, x_BPW: torch.Tensor) -> torch.Tensor:
        z_BPE = torch.bmm(x_BPW.transpose(0, 1), self.weight).transpose(0, 1)
        return z_BPE if self.bias is None else z_BPE + self.bias


class SparsePertokenMoE(nn.Module):
    """Each position p owns E experts of width F = hidden/E (one of them shared, always on).

    `forward` returns (y, balance loss or None): the loss travels with the output, never in module state.
    """

    def __init__(self, n_pos: int, width: int, hidden: int, cfg, init_dist: InitDist = InitDist.xavier_uniform,
                 down_scale: float = 0.01):
        super().__init__()
        E = cfg.n_experts
        assert hidden % E == 0, (hidden, E)   # the model config validated the expert widths
        self.n_pos, self.width, self.expert_hidden = n_pos, width, hidden // E
        self.n_routed, self.k_routed = cfg.n_routed, cfg.n_routed_active
        self.alpha = float(cfg.gate_alpha)
        self.compute = cfg.compute
        self.balance = cfg.balance_loss
        self.balance_weight = float(cfg.balance_weight)
        self.router = TokenRouter(n_pos, width, self.n_routed)
        self.experts = PerTokenSwiGLU(n_pos * self.n_routed, width, self.expert_hidden, False, init_dist, down_scale, fan_hidden=hidden)
        shared_w = {SharedExpert.narrow: self.expert_hidden, SharedExpert.full: hidden, SharedExpert.none: 0}[cfg.shared_expert]
        self.shared = PerTokenSwiGLU(n_pos, width, shared_w, False, init_dist, down_scale, fan_hidden=hidden) if shared_w else None
        self.last_usage_PE: torch.Tensor | None = None   # metrics only: rows routed to each (position, expert)

    def route(self, x_BPW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs_BPE, top gates_BPK renormalised, top expert ids_BPK)."""
        probs_BPE = F.softmax(self.router(x_BPW), dim=-1)
        top_BPK, idx_BPK = probs_BPE.topk(self.k_routed, dim=-1)
        return probs_BPE, top_BPK / top_BPK.sum(-1, keepdim=True), idx_BPK

    def forward(self, x_BPW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, P, W = x_BPW.shape
        Er, K = self.n_routed, self.k_routed
        probs_BPE, gate_BPK, idx_BPK = self.route(x_BPW)
        onehot_BPE = torch.zeros_like(probs_BPE).scatter_(-1, idx_BPK, 1.0)
        usage_PE = onehot_BPE.mean(0) / K
        self.last_usage_PE = usage_PE.detach()
        balance = None
        if self.balance is BalanceLoss.switch:
            # Switch-Transformer balance per position: E_r * sum_e f_pe * mean prob_pe, averaged over P.
            balance = self.balance_weight * Er * (usage_PE * probs_BPE.mean(0)).sum(-1).mean()
        if self.compute is MoECompute.grouped:
            pos_BPK = torch.arange(P, device=x_BPW.device).view(1, P, 1).expand(B, P, K)
            row_BPK = torch.arange(B, device=x_BPW.device).view(B, 1, 1).expand(B, P, K)
            bank_BPK = pos_BPK * Er + idx_BPK
            routed_BPW = grouped_experts(x_BPW, bank_BPK.reshape(-1), row_BPK.reshape(-1), pos_BPK.reshape(-1),
                                        gate_BPK.reshape(-1), self.experts, k_per_row=K)
        else:
            gates_BPE = torch.zeros_like(probs_BPE).scatter(-1, idx_BPK, gate_BPK)
            xrep_BGW = x_BPW.unsqueeze(2).expand(B, P, Er, W).reshape(B, P * Er, W)
            out_BPEW = self.experts(xrep_BGW).reshape(B, P, Er, W)
            routed_BPW = (out_BPEW * gates_BPE.unsqueeze(-1)).sum(2)
        y_BPW = self.alpha * routed_BPW
        if self.shared is not None:
            y_BPW = y_BPW + self.shared(x_BPW)
        return y_BPW, balance
