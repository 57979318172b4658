"""LMN product-key memory (spec storage.md §7.2, product keys after arXiv 1907.05242).

Legend: Q queries (any leading dims ... before them, e.g. heads), N sub-keys per axis (n_sub), H half key
width (d_key / 2), k per-axis top-k (k_axis), K slots read per query (top_k), M composite keys (N * N).

Slots are the N * N composite keys [C1_i; C2_j], slot id i * N + j; a query q = [q1; q2] scores slot
(i, j) as q1.C1_i + q2.C2_j. Product-key search takes the top-k of each axis and the top-K of their k * k
sums: with k >= K it returns the brute-force top-K, since a slot in the top-K has at most K - 1 better
rows on each axis.
"""

from __future__ import annotations

import torch


def product_key_topk(q1_QH: torch.Tensor, q2_QH: torch.Tensor, c1_NH: torch.Tensor, c2_NH: torch.Tensor,
                     k_axis: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_QK, slots_QK), scores descending; leading dims of q (heads, ...) broadcast against c's."""
    n_sub = c1_NH.shape[-2]
    assert c2_NH.shape[-2] == n_sub and k_axis <= n_sub and top_k <= k_axis * k_axis, (n_sub, k_axis, top_k)
    s1_Qk, i1_Qk = (q1_QH @ c1_NH.transpose(-1, -2)).topk(k_axis, dim=-1)
    s2_Qk, i2_Qk = (q2_QH @ c2_NH.transpose(-1, -2)).topk(k_axis, dim=-1)
    pair_QP = (s1_Qk.unsqueeze(-1) + s2_Qk.unsqueeze(-2)).flatten(-2)        # P = k * k, row a * k + b
    scores_QK, p_QK = pair_QP.topk(top_k, dim=-1)
    i_QK = i1_Qk.gather(-1, torch.div(p_QK, k_axis, rounding_mode="floor"))
    j_QK = i2_Qk.gather(-1, p_QK % k_axis)
    return scores_QK, i_QK * n_sub + j_QK


def composite_keys(c1_NH: torch.Tensor, c2_NH: torch.Tensor) -> torch.Tensor:
    """All N * N composite keys (M, 2H), row i * N + j = [C1_i; C2_j] (what `flat_topk` searches)."""
    n = c1_NH.shape[0]
    return torch.cat([c1_NH.repeat_interleave(n, 0), c2_NH.repeat(n, 1)], dim=-1)


def flat_topk(q_QD: torch.Tensor, keys_MD: torch.Tensor, top_k: int, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force (scores_QK, slots_QK) over every key: the O(M * d_key) baseline product keys replace.

    Keys are scored `chunk` rows at a time and merged into a running top-K, so memory stays
    Q * (chunk + K) scores at any M.
    """
    best_s = q_QD.new_full((q_QD.shape[0], 0), float("-inf"))
    best_i = torch.empty((q_QD.shape[0], 0), dtype=torch.int64, device=q_QD.device)
    for lo in range(0, keys_MD.shape[0], chunk):
        s_QC = q_QD @ keys_MD[lo:lo + chunk].T
        idx_QC = torch.arange(lo, lo + s_QC.shape[1], device=q_QD.device).expand_as(s_QC)
        s_QC, idx_QC = torch.cat([best_s, s_QC], 1), torch.cat([best_i, idx_QC], 1)
        best_s, pos = s_QC.topk(min(top_k, s_QC.shape[1]), dim=-1)
        best_i = idx_QC.gather(-1, pos)
    return best_s, best_i
