"""Per-token layers: T independent weight banks stored as (T, I, O) and applied by one batched matmul.

Legend: B batch rows, T token positions (weight banks), I input width, O output width, F hidden width.

Every per-token and expert weight of the models lives in a `PerTokenLinear` (attribute `weight` (T, I, O),
optional `bias` (T, O)) and is applied through `recmix.kernels.pertoken_dispatch.pertoken_linear`, so a
post-training quantizer can find and replace them by walking modules.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recmix.kernels import pertoken_dispatch as kernels
from recmix.platform.specs.model import InitDist, Norm


class PerTokenLinear(nn.Module):
    """y_BTO[:, t] = x_BTI[:, t] @ weight[t] (+ bias[t])."""

    def __init__(self, n_banks: int, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.n_banks, self.d_in, self.d_out = n_banks, d_in, d_out
        self.weight = nn.Parameter(torch.empty(n_banks, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(n_banks, d_out)) if bias else None
        self.reset_parameters(InitDist.xavier_uniform, 1.0)

    def reset_parameters(self, dist: InitDist, scale: float) -> None:
        """Xavier per bank (fan_in = I, fan_out = O), multiplied by `scale`; biases zero."""
        with torch.no_grad():
            if dist is InitDist.xavier_uniform:
                bound = math.sqrt(6.0 / (self.d_in + self.d_out))
                self.weight.uniform_(-bound, bound)
            else:
                assert dist is InitDist.xavier_normal, dist
                self.weight.normal_(0.0, math.sqrt(2.0 / (self.d_in + self.d_out)))
            self.weight.mul_(scale)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return kernels.pertoken_linear(x_BTI, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"banks={self.n_banks}, in={self.d_in}, out={self.d_out}, bias={self.bias is not None}"


class PerTokenSwiGLU(nn.Module):
    """pSwiGLU: down_t( SiLU(gate_t x) * up_t x ) per bank; gate and up fused in one (T, I, 2F) bank.

    `w_in.weight[..., :F]` is the gate, `[..., F:]` the up projection.
    """

    def __init__(self, n_banks: int, d: int, hidden: int, bias: bool = False, init_dist: InitDist = InitDist.xavier_uniform,
                 down_scale: float = 0.01, fan_hidden: Optional[int] = None):
        super().__init__()
        self.hidden = hidden
        self.w_in = PerTokenLinear(n_banks, d, 2 * hidden, bias)
        self.w_out = PerTokenLinear(n_banks, hidden, d, bias)
        # Xavier as if gate, up and down were separate (d, F) / (F, d) matrices; experts split from a dense
        # pSwiGLU pass fan_hidden = the dense width so "enlarge, then sparse" keeps the dense init scale.
        fan = fan_hidden or hidden
        rescale = math.sqrt((d + hidden) / (d + fan))
        for part in (slice(0, hidden), slice(hidden, 2 * hidden)):
            tmp = PerTokenLinear(n_banks, d, hidden)
            tmp.reset_parameters(init_dist, rescale)
            with torch.no_grad():
                self.w_in.weight[..., part] = tmp.weight
        self.w_out.reset_parameters(init_dist, down_scale * rescale)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        gu_BTF2 = self.w_in(x_BTI)
        gate_BTF, up_BTF = gu_BTF2.split(self.hidden, dim=-1)
        return self.w_out(F.silu(gate_BTF) * up_BTF)


class PerTokenFFN(nn.Module):
    """RankMixer PFFN: f2_t(GELU(f1_t(x))) with biases."""

    def __init__(self, n_banks: int, d: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w_in = PerTokenLinear(n_banks, d, hidden, bias)
        self.w_out = PerTokenLinear(n_banks, hidden, d, bias)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x_BTI)))


def make_norm(kind: Norm, width: int) -> nn.Module:
    """Per-token norm over the last dim (no batch statistics)."""
    if kind is Norm.rmsnorm:
        return nn.RMSNorm(width, eps=1e-6)
    assert kind is Norm.layernorm, kind
    return nn.LayerNorm(width)


def mlp(d_in: int, d_hidden: int, d_out: int, act: Optional[nn.Module] = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), act if act is not None else nn.SiLU(), nn.Linear(d_hidden, d_out))
