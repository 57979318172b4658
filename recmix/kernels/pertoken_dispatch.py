"""Per-token linear: T independent weight banks applied by one batched matmul.

Legend: B batch rows, T tokens (weight banks), I input width, O output width.
    x_BTI  activations, batch-first as the models hold them
    w_TIO  one (I, O) weight matrix per token position
    y_BTO  output

This is the dispatch point every per-token layer goes through; quantized (W8A16) and Triton variants
plug in here (`recmix.kernels.w8a16`), so model code never picks a kernel itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

# Open FLOP counters (see `count_flops`); empty almost always, so the hot path pays one truth test.
_COUNTERS: list[list[int]] = []


@contextmanager
def count_flops() -> Iterator[list[int]]:
    """Count the matmul FLOPs (2 per multiply-add) of every per-token linear issued inside the block.

    Yields a one-element list whose value is the running total; used to check the analytic counters.
    """
    box = [0]
    _COUNTERS.append(box)
    try:
        yield box
    finally:
        _COUNTERS.remove(box)


def record_flops(rows: int, banks: int, d_in: int, d_out: int) -> None:
    """For kernels outside this module (quantized variants) to report the work they issued."""
    for box in _COUNTERS:
        box[0] += 2 * rows * banks * d_in * d_out


def pertoken_linear_reference(x_BTI: torch.Tensor, w_TIO: torch.Tensor, b_TO: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Readable reference: a loop of T ordinary matmuls."""
    outs = [x_BTI[:, t] @ w_TIO[t] for t in range(w_TIO.shape[0])]
    y_BTO = torch.stack(outs, dim=1)
    return y_BTO if b_TO is None else y_BTO + b_TO


def pertoken_linear(x_BTI: torch.Tensor, w_TIO: torch.Tensor, b_TO: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One `bmm` over the token axis: (T, B, I) @ (T, I, O) -> (T, B, O)."""
    assert x_BTI.dim() == 3 and w_TIO.dim() == 3 and x_BTI.shape[1] == w_TIO.shape[0] and x_BTI.shape[2] == w_TIO.shape[1], (
        tuple(x_BTI.shape), tuple(w_TIO.shape))
    if _COUNTERS:
        record_flops(x_BTI.shape[0], *w_TIO.shape)
    y_TBO = torch.bmm(x_BTI.transpose(0, 1), w_TIO)
    y_BTO = y_TBO.transpose(0, 1)
    return y_BTO if b_TO is None else y_BTO + b_TO
