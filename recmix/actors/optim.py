"""Row-wise sparse optimizers (storage.md 4) in torch, one implementation for both places they run:
the shard (numpy slabs viewed as tensors, per-batch mode) and the trainer's working set (pass mode,
on `device`). Gradients must already be summed per unique id (row-wise Adagrad is not additive over
repeated applications).

Legend: R unique rows of the step, E embedding dim, S optimizer state width.
"""

from __future__ import annotations

import torch

from recmix.platform.specs.embedding import AdamConfig, RowwiseAdagradConfig, SGDConfig


def apply(opt, w_RE: torch.Tensor, s_RS: torch.Tensor, g_RE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the new (values, state); inputs are not modified. fp32 throughout."""
    if isinstance(opt, SGDConfig):
        return w_RE - opt.lr * g_RE, s_RS
    if isinstance(opt, RowwiseAdagradConfig):
        acc_R1 = s_RS + (g_RE * g_RE).mean(dim=1, keepdim=True)
        return w_RE - opt.lr * g_RE / (acc_R1.sqrt() + opt.eps), acc_R1
    if isinstance(opt, AdamConfig):
        e = w_RE.shape[1]
        b1, b2 = opt.betas
        m_RE = b1 * s_RS[:, :e] + (1 - b1) * g_RE
        v_RE = b2 * s_RS[:, e:2 * e] + (1 - b2) * g_RE * g_RE
        t_R1 = s_RS[:, 2 * e:] + 1
        mhat = m_RE / (1 - torch.pow(torch.full_like(t_R1, b1), t_R1))
        vhat = v_RE / (1 - torch.pow(torch.full_like(t_R1, b2), t_R1))
        return w_RE - opt.lr * mhat / (vhat.sqrt() + opt.eps), torch.cat([m_RE, v_RE, t_R1], dim=1)
    raise AssertionError(f"unhandled optimizer {opt!r}")
