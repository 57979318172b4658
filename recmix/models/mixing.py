"""Mix and Revert (spec §2.2): parameter-free, zero-FLOP token mixing and its exact inverse.

Legend: B batch, T tokens, D token width, H heads, S = D/H slice width, M = T*S mixed-token width.

Mix:    (B, T, D) -> (B, T, H, S) -> swap T,H -> (B, H, T*S): mixed token h = concat_t x_t^(h)
Revert: (B, H, T*S) -> (B, H, T, S) -> swap H,T -> (B, T, D): exact inverse for any H | D
Only reshapes and one transpose, so Revert(Mix(x)) is bitwise x.
"""

from __future__ import annotations

import torch


def mix(x_BTD: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, D = x_BTD.shape
    if D % n_heads:
        raise ValueError(f"n_heads ({n_heads}) must divide d_model ({D})")
    S = D // n_heads
    return x_BTD.reshape(B, T, n_heads, S).transpose(1, 2).reshape(B, n_heads, T * S)


def revert(y_BHM: torch.Tensor, n_tokens: int) -> torch.Tensor:
    B, H, M = y_BHM.shape
    if M % n_tokens:
        raise ValueError(f"mixed width ({M}) is not a multiple of n_tokens ({n_tokens})")
    S = M // n_tokens
    return y_BHM.reshape(B, H, n_tokens, S).transpose(1, 2).reshape(B, n_tokens, H * S)
