"""Per-token layers applied to a contiguous range of their weight banks.

UG-Sep runs the user banks (heads/tokens < Cu or Tu) on U unique-user rows and the candidate banks on B
candidate rows, so every per-token layer must run on a slice of its banks. A layer that implements
`forward_banks(x, lo, hi)` (a quantized one, say) is used as is; a plain PerTokenLinear slices its
weight. The full range calls the module itself, so the unmasked path is bitwise the baseline's.

Legend: B rows, P banks in the range [lo, hi), I input width, O output width, F hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recmix.kernels.pertoken_dispatch import pertoken_linear


def linear_banks(lin, x_BPI: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    assert x_BPI.shape[1] == hi - lo, (tuple(x_BPI.shape), lo, hi)
    if lo == 0 and hi == lin.n_banks:
        return lin(x_BPI)
    if hasattr(lin, "forward_banks"):
        return lin.forward_banks(x_BPI, lo, hi)
    bias = None if lin.bias is None else lin.bias[lo:hi]
    return pertoken_linear(x_BPI, lin.weight[lo:hi], bias)


def swiglu_banks(ffn, x_BPI: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """PerTokenSwiGLU on banks [lo, hi): down(SiLU(gate x) * up x)."""
    if hi == lo:
        return x_BPI.new_zeros(x_BPI.shape[0], 0, ffn.w_out.d_out)
    if lo == 0 and hi == ffn.w_in.n_banks:
        return ffn(x_BPI)
    gate_BPF, up_BPF = linear_banks(ffn.w_in, x_BPI, lo, hi).split(ffn.hidden, dim=-1)
    return linear_banks(ffn.w_out, F.silu(gate_BPF) * up_BPF, lo, hi)


def ffn_banks(ffn, x_BPI: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """PerTokenFFN on banks [lo, hi): w_out(GELU(w_in x))."""
    if hi == lo:
        return x_BPI[:, :0]
    return linear_banks(ffn.w_out, F.gelu(linear_banks(ffn.w_in, x_BPI, lo, hi)), lo, hi)
