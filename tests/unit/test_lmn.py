"""LMN product-key memory: exact top-K, gradients, memory loss, UG-Sep purity, training (spec storage.md §7)."""

from __future__ import annotations

import pytest
import torch

from recmix.models.lmn import composite_keys, flat_topk, product_key_topk


@pytest.mark.parametrize("n_sub,k_axis,top_k", [(8, 4, 4), (16, 8, 5), (7, 7, 49), (5, 3, 9)])
def test_product_keys_equal_brute_force(n_sub, k_axis, top_k):
    g = torch.Generator().manual_seed(n_sub * 100 + top_k)
    Q, H = 33, 6
    q_QD = torch.randn(Q, 2 * H, generator=g, dtype=torch.float64)
    c1, c2 = (torch.randn(n_sub, H, generator=g, dtype=torch.float64) for _ in range(2))
    s_pk, slots_pk = product_key_topk(q_QD[:, :H], q_QD[:, H:], c1, c2, k_axis, top_k)
    s_fl, slots_fl = flat_topk(q_QD, composite_keys(c1, c2), top_k, chunk=10)   # chunks exercise the merge
    # brute force in the most literal form: every composite key, one score each
    full = q_QD @ composite_keys(c1, c2).T
    s_bf, slots_bf = full.topk(top_k, dim=-1)
    if top_k <= k_axis or k_axis == n_sub:   # the exactness guarantee
        assert torch.equal(slots_pk.sort(-1).values, slots_bf.sort(-1).values)
        torch.testing.assert_close(s_pk, s_bf)
    assert torch.equal(slots_fl.sort(-1).values, slots_bf.sort(-1).values)
    torch.testing.assert_close(s_fl, s_bf)
    # the slots' own scores recomputed from their ids: slot = i * n_sub + j
    i, j = slots_pk // n_sub, slots_pk % n_sub
    torch.testing.assert_close(s_pk, (q_QD[:, None, :H] * c1[i]).sum(-1) + (q_QD[:, None, H:] * c2[j]).sum(-1))


def test_product_keys_batch_over_heads():
    g = torch.Generator().manual_seed(1)
    h, Q, N, H = 3, 10, 9, 4
    q1, q2 = torch.randn(h, Q, H, generator=g), torch.randn(h, Q, H, generator=g)
    c1, c2 = torch.randn(h, N, H, generator=g), torch.randn(h, N, H, generator=g)
    s, slots = product_key_topk(q1, q2, c1, c2, 4, 4)
    assert s.shape == slots.shape == (h, Q, 4)
    for e in range(h):
        s_e, slots_e = product_key_topk(q1[e], q2[e], c1[e], c2[e], 4, 4)
        assert torch.equal(slots[e], slots_e)
        torch.testing.assert_close(s[e], s_e)
