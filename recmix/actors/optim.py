"""Row-wise sparse optimizers (storage.md 4), one implementation for both places they run: the shard
(numpy slabs, per-batch mode; the shard process never imports torch, which costs seconds per actor
start) and the trainer's working set (torch tensors on `device`, pass mode). Only operators that
numpy arrays and torch tensors share are used, plus two shims. Gradients must already be summed per
unique id (row-wise Adagrad is not additive over repeated applications). fp32 throughout.

Legend: R unique rows of the step, E embedding dim, S optimizer state width.
"""

from __future__ import annotations

import numpy as np

from recmix.platform.specs.embedding import AdamConfig, RowwiseAdagradConfig, SGDConfig


def _row_mean(x):
    return x.mean(axis=1, keepdims=True) if isinstance(x, np.ndarray) else x.mean(dim=1, keepdim=True)


def _cat(parts):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=1)
    import torch

    return torch.cat(parts, dim=1)


def apply(opt, w_RE, s_RS, g_RE):
    """Returns the new (values, state); inputs are not modified."""
    if isinstance(opt, SGDConfig):
        return w_RE - opt.lr * g_RE, s_RS
    if isinstance(opt, RowwiseAdagradConfig):
        acc_R1 = s_RS + _row_mean(g_RE * g_RE)
        return w_RE - opt.lr * g_RE / (acc_R1 ** 0.5 + opt.eps), acc_R1
    if isinstance(opt, AdamConfig):
        e = w_RE.shape[1]
        b1, b2 = opt.betas
        m_RE = b1 * s_RS[:, :e] + (1 - b1) * g_RE
        v_RE = b2 * s_RS[:, e:2 * e] + (1 - b2) * g_RE * g_RE
        t_R1 = s_RS[:, 2 * e:] + 1
        mhat = m_RE / (1 - b1 ** t_R1)
        vhat = v_RE / (1 - b2 ** t_R1)
        return w_RE - opt.lr * mhat / (vhat ** 0.5 + opt.eps), _cat([m_RE, v_RE, t_R1])
    raise AssertionError(f"unhandled optimizer {opt!r}")
