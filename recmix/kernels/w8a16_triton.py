"""Triton kernel for the batched per-token W8A16 matmul; reference: `w8a16_reference.pertoken_linear_w8a16_reference`.

Legend as in recmix.kernels.w8a16_reference (B rows, T tokens, I = K input width, O = N output width).
Grid (t, M-tiles, N-tiles): each program owns one (BLOCK_M, BLOCK_N) output tile of one token's bank.
Per K step it loads a 16-bit x tile and an int8 q tile, converts q to the activation dtype in registers
(|q| <= 127 is exact in fp16 and bf16) and accumulates the dot in fp32. The symmetric scale is constant
along K within a channel (per_channel) or within a group (per_group, BLOCK_K divides the group), so it
multiplies the fp32 partial sums: x.(s*q) == s*(x.q) exactly, and the dequantized weight never exists in
memory, not even a 16-bit rounded copy of it.

Interpreter (TRITON_INTERPRET=1, used by the CPU tests): triton 3.9's interpreter runs `tl.dot` through
numpy, which has no bfloat16 (it stores bf16 as raw uint16 and multiplies the bit patterns), and its
int -> bf16 cast is wrong too. For bf16 under the interpreter the launcher sets UPCAST_DOT, which feeds the
dot fp32 operands; the GPU always takes the native 16-bit dot. fp16 runs the GPU code path in the interpreter.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from recmix.kernels.w8a16_reference import GROUP_SIZE, check_inputs
from recmix.platform.specs.w8a16 import Granularity


@triton.jit
def _w8a16_pertoken_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xt, stride_xk,
    stride_qt, stride_qk, stride_qn,
    stride_st, stride_sg, stride_sn,
    stride_bt, stride_bn,
    stride_ym, stride_yt, stride_yn,
    GROUP: tl.constexpr,  # 0: per_channel; else rows of K per scale group (a multiple of BLOCK_K)
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + t * stride_xt + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    q_ptrs = q_ptr + t * stride_qt + rk[:, None] * stride_qk + rn[None, :] * stride_qn
    s_row = s_ptr + t * stride_st + rn * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if UPCAST_DOT:
            part = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, q.to(x.dtype))
        if GROUP > 0:
            s_g = tl.load(s_row + (k0 // GROUP) * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            part = part * s_g[None, :]
        acc += part
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K * stride_qk
    if GROUP == 0:
        s_c = tl.load(s_row, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * s_c[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + t * stride_bt + rn * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    y_ptrs = y_ptr + t * stride_yt + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _blocks(M: int) -> tuple[int, int, int]:
    # Small M is the UG-Sep U-path regime (weight-bound): narrow M tiles, wide N tiles. tl.dot needs >= 16.
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    return block_m, 64, 32


def pertoken_linear_w8a16_triton(
    x_BTI: torch.Tensor,
    q_TIO: torch.Tensor,
    s: torch.Tensor,
    b_TO: Optional[torch.Tensor] = None,
    *,
    group_size: int = GROUP_SIZE,
    blocks: Optional[tuple[int, int, int]] = None,
) -> torch.Tensor:
    """Launch the kernel; fp32 activations are run as bf16 and returned as fp32 (W8A16 means 16-bit A)."""
    g = check_inputs(x_BTI, q_TIO, s, b_TO, group_size)
    B, T, I = x_BTI.shape
    O = q_TIO.shape[2]
    x = x_BTI if x_BTI.dtype in (torch.float16, torch.bfloat16) else x_BTI.to(torch.bfloat16)
    block_m, block_n, block_k = blocks or _blocks(B)
    if min(block_m, block_n, block_k) < 16:
        raise ValueError(f"Triton tl.dot needs blocks >= 16, got {(block_m, block_n, block_k)}")
    group = 0 if g is Granularity.per_channel else group_size
    if group and group % block_k:
        raise ValueError(f"per_group: group_size {group_size} must be a multiple of BLOCK_K {block_k}")
    y = torch.empty((B, T, O), dtype=x.dtype, device=x.device)
    s3 = s if s.dim() == 3 else s.unsqueeze(1)  # uniform (T, G, O) strides; G = 1 per channel
    b = b_TO if b_TO is not None else s3  # any valid pointer; unused when HAS_BIAS is False
    b_strides = (b_TO.stride(0), b_TO.stride(1)) if b_TO is not None else (0, 0)
    grid = (T, triton.cdiv(B, block_m), triton.cdiv(O, block_n))
    _w8a16_pertoken_kernel[grid](
        x, q_TIO, s3, b, y,
        B, O, I,
        x.stride(0), x.stride(1), x.stride(2),
        q_TIO.stride(0), q_TIO.stride(1), q_TIO.stride(2),
        s3.stride(0), s3.stride(1), s3.stride(2),
        *b_strides,
        y.stride(0), y.stride(1), y.stride(2),
        GROUP=group,
        HAS_BIAS=b_TO is not None,
        UPCAST_DOT=_interpreting() and x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y if y.dtype == x_BTI.dtype else y.to(x_BTI.dtype)
