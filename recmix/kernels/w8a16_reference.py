"""W8A16 quantization and the readable reference matmul: int8 weights + fp16 scales, 16-bit activations (spec §5.8).

Legend: B rows per token, T tokens (weight banks), I input width, O output width, G scale groups along I.
    x_BTI   activations (fp16 / bf16; fp32 accepted and returned as fp32)
    q_TIO   int8 weight in [-127, 127]; `quantize_w8a16` returns it as a view of output-major (T, O, I)
            storage, the layout `torch._weight_int8pack_mm` wants (so the CPU path never copies it)
    s_TO    fp16 scale per output channel (granularity per_channel)
    s_TGO   fp16 scale per group of `group_size` rows of I (granularity per_group; last group may be short)
    w_TIO ~= s * q

The fast paths (w8a16_cpu.py, w8a16_triton.py) and the dispatcher (w8a16.py) build on this file; it imports none of them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from recmix.platform.specs.w8a16 import Granularity

GROUP_SIZE = 128
_QMAX = 127
_FP16_TINY = 2.0**-24  # smallest positive fp16: scale floor, so all-zero columns get q = 0 (no 0/0)
_FP16_MAX = 65504.0


def quantize_w8a16(
    w_TIO: torch.Tensor, granularity: Granularity | str = Granularity.per_channel, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 PTQ of per-token weights: (q_TIO int8, s_TO or s_TGO fp16).

    q is rounded against the fp16-ROUNDED scale, so |w - s*q| <= s/2 holds for the stored s (invariant 29).
    """
    granularity = Granularity(granularity)
    if w_TIO.dim() != 3 or not w_TIO.is_floating_point():
        raise ValueError(f"quantize_w8a16 expects a floating (T, I, O) weight, got shape {tuple(w_TIO.shape)} dtype {w_TIO.dtype}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    w = w_TIO.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("quantize_w8a16: weight contains inf/nan")
    T, I, O = w.shape
    if granularity is Granularity.per_channel:
        amax = w.abs().amax(dim=1)  # (T, O)
    else:
        G = math.ceil(I / group_size)
        padded = torch.nn.functional.pad(w, (0, 0, 0, G * group_size - I))  # zero rows do not change a max of |w|
        amax = padded.view(T, G, group_size, O).abs().amax(dim=2)  # (T, G, O)
    if float(amax.max()) / _QMAX > _FP16_MAX:
        raise ValueError(f"quantize_w8a16: max |w| = {float(amax.max()):.3g} gives a scale above fp16 max {_FP16_MAX}")
    s = (amax / _QMAX).clamp_min(_FP16_TINY).half()
    q = torch.round(w / expand_scales(s, I, group_size)).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q.transpose(1, 2).contiguous().transpose(1, 2), s


def granularity_of(q_TIO: torch.Tensor, s: torch.Tensor, group_size: int = GROUP_SIZE) -> Granularity:
    """Infer and validate the scale layout; raises ValueError naming the shapes."""
    if q_TIO.dim() != 3 or q_TIO.dtype != torch.int8:
        raise ValueError(f"q must be int8 (T, I, O), got shape {tuple(q_TIO.shape)} dtype {q_TIO.dtype}")
    T, I, O = q_TIO.shape
    if s.dim() == 2 and tuple(s.shape) == (T, O):
        return Granularity.per_channel
    G = math.ceil(I / group_size)
    if s.dim() == 3 and tuple(s.shape) == (T, G, O):
        return Granularity.per_group
    raise ValueError(
        f"scale shape {tuple(s.shape)} matches neither per_channel (T, O) = {(T, O)} nor per_group "
        f"(T, ceil(I/{group_size}), O) = {(T, G, O)} for q of shape {(T, I, O)}"
    )


def expand_scales(s: torch.Tensor, I: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """fp32 scales broadcastable against (T, I, O)."""
    if s.dim() == 2:
        return s.float().unsqueeze(1)
    return s.float().repeat_interleave(group_size, dim=1)[:, :I]


def dequantize_w8a16(q_TIO: torch.Tensor, s: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    granularity_of(q_TIO, s, group_size)
    return q_TIO.float() * expand_scales(s, q_TIO.shape[1], group_size)


def check_inputs(x_BTI: torch.Tensor, q_TIO: torch.Tensor, s: torch.Tensor, b_TO: Optional[torch.Tensor], group_size: int) -> Granularity:
    """Validate shapes and dtypes of one W8A16 call (ValueError naming them); returns the scale granularity."""
    g = granularity_of(q_TIO, s, group_size)
    T, I, O = q_TIO.shape
    if x_BTI.dim() != 3 or x_BTI.shape[1] != T or x_BTI.shape[2] != I:
        raise ValueError(f"x shape {tuple(x_BTI.shape)} does not match (B, T, I) with T={T}, I={I} from q {(T, I, O)}")
    if x_BTI.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"W8A16 activations must be fp16, bf16 or fp32, got {x_BTI.dtype}")
    if b_TO is not None and tuple(b_TO.shape) != (T, O):
        raise ValueError(f"bias shape {tuple(b_TO.shape)} != (T, O) = {(T, O)}")
    return g


def pertoken_linear_w8a16_reference(
    x_BTI: torch.Tensor, q_TIO: torch.Tensor, s: torch.Tensor, b_TO: Optional[torch.Tensor] = None, *, group_size: int = GROUP_SIZE
) -> torch.Tensor:
    """Readable reference: dequantize to fp32, one fp32 bmm over the token axis, cast to x's dtype."""
    check_inputs(x_BTI, q_TIO, s, b_TO, group_size)
    w_TIO = dequantize_w8a16(q_TIO, s, group_size)
    y_BTO = torch.bmm(x_BTI.float().transpose(0, 1), w_TIO).transpose(0, 1)
    if b_TO is not None:
        y_BTO = y_BTO + b_TO.float()
    return y_BTO.to(x_BTI.dtype)
