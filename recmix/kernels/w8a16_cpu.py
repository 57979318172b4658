"""The measured-fastest CPU path of the per-token W8A16 matmul (docs/kernels.md, `recmix bench w8a16`).

Legend as in recmix.kernels.w8a16_reference (B rows, T tokens, I input width, O output width).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from recmix.kernels.w8a16_reference import GROUP_SIZE, check_inputs, dequantize_w8a16
from recmix.platform.specs.w8a16 import Granularity

# Rows per token up to which torch._weight_int8pack_mm (bf16 activations, weights stay int8) beat or tied
# the int8 -> fp32 bmm path, one thread, on the AVX2 reference machine (`recmix bench w8a16`, docs/kernels.md).
INT8PACK_MAX_ROWS = 32
# torch 2.13's CPU `_weight_int8pack_mm` segfaults (no error) for K = I not a multiple of 16 (measured on an
# AVX-512 VM, N in {3, 20}: K in {8, 24, 40, 56, 72, 120, 136, 200, 264} crash, K in {16, 32, 48, 64, 128, 256}
# pass; earlier K in {2..33, 100, 129}); such layers take the bmm path.
INT8PACK_K_MULTIPLE = 16


def pertoken_linear_w8a16_cpu(
    x_BTI: torch.Tensor, q_TIO: torch.Tensor, s: torch.Tensor, b_TO: Optional[torch.Tensor] = None, *, group_size: int = GROUP_SIZE
) -> torch.Tensor:
    """- per_channel, rows <= INT8PACK_MAX_ROWS, I % 16 == 0: `torch._weight_int8pack_mm` per token (the weight stays
      int8, bf16 activations, ATen's vectorized int8 GEMM), the fp32 scale applied to its output; T calls, T is small.
    - otherwise: int8 -> fp32 conversion of the weight, fp32 bmm, per-channel scale applied to the output
      (exact: the scale is constant along I); per_group dequantizes fully first. The fp32 copy is transient.
    """
    g = check_inputs(x_BTI, q_TIO, s, b_TO, group_size)
    B, T, I = x_BTI.shape
    if g is Granularity.per_channel and B <= INT8PACK_MAX_ROWS and I % INT8PACK_K_MULTIPLE == 0:
        x_bf = x_BTI.to(torch.bfloat16)
        q_TOI = q_TIO.transpose(1, 2)
        # int8pack wants bf16 scales; converting T*O fp16 scales per call cost more than the M*T*O output
        # multiply at small M, and scaling in fp32 afterwards keeps s exact (no bf16 rounding of s)
        ones = _ones_bf16(q_TIO.shape[2])
        outs = [torch._weight_int8pack_mm(x_bf[:, t], q_TOI[t].contiguous(), ones) for t in range(T)]
        # same-dtype multiply: a bf16 * fp32 promoting `mul` takes a slow non-vectorized path (~0.25 ms here)
        y_BTO = torch.stack(outs, dim=1).float().mul_(s.float())
    elif g is Granularity.per_channel:
        y_BTO = torch.bmm(x_BTI.float().transpose(0, 1), q_TIO.float()).transpose(0, 1) * s.float()
    else:
        y_BTO = torch.bmm(x_BTI.float().transpose(0, 1), dequantize_w8a16(q_TIO, s, group_size)).transpose(0, 1)
    if b_TO is not None:
        y_BTO = y_BTO + b_TO.float()
    return y_BTO.to(x_BTI.dtype)


@functools.lru_cache(maxsize=32)
def _ones_bf16(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16)
