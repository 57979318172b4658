"""Item-item neighbourhood token of a sequence (`tokens.neighbors` on a sequence feature of the schema).

Legend: B rows, L positions (padded with -1), K neighbours per item, N items (the target table's vocab),
V values of the paired attribute (the rating), F user folds, U users, R training rows.

Item-based collaborative filtering as a derived feature: the candidate's similarity to each history item,
summed per attribute value, so the model reads "how much does this candidate resemble the items this user
rated 5 (or 1)". The similarity is a statistic fitted from the training split before training
(`fit_statistics`), not a weight: cosine between items' user-centred label vectors, times
co-count / (co-count + shrink), keeping each item's K largest in magnitude. A neural model learns such
pairwise item interactions only through low-rank embeddings; the fitted table has them at full rank.

Leakage: a training row's own label is part of the fitted similarity of its candidate and its history items
(the same user rated both). Fitted as is, the model learns to over-trust the feature (measured on ml-100k,
docs/log.md). So users are split into F folds by a hash of their id; a training row reads the table fitted
without its fold, evaluation and serving read the table fitted on every user. Buffers (state_dict, so
checkpoints and artifacts carry them): ids_GNK / sims_GNK with G = F + 1 (index F = all users), each item's
neighbours sorted by id (empty slots, id -1, first).

Output per row (width V + 1): [sum_j s_j * 1{a_j = v} / (1 + sum_j |s_j|) for each v, log(1 + sum_j |s_j|)];
0 for an empty history or a candidate without fitted neighbours.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from recmix.platform.specs.data import FeatureSchema, ItemNeighbors

from .derived import DerivedFeature

BLOCK_CELLS = 1 << 24    # item rows x items of one dense similarity block (64 MiB of float32)


def user_fold(users: torch.Tensor | np.ndarray, folds: int):
    """Fold of each user id: a multiplicative hash, the same in numpy (fit) and torch (forward)."""
    return ((users & 0x7FFFFFFF) * 2654435761) % 4294967296 % folds   # masked: the product fits in int64


class NeighborhoodToken(DerivedFeature):
    """Name `<sequence>_neighbors`, in the target's (candidate-side) group."""

    def __init__(self, schema: FeatureSchema, seq: str, cfg: ItemNeighbors, target: str):
        super().__init__()
        tf = schema.feature(target)
        self.name, self.group = f"{seq}_neighbors", tf.group
        self.seq, self.attr, self.target, self.user = seq, cfg.attribute, target, cfg.user
        self.inputs = (seq, cfg.attribute, target, cfg.user)
        self.fit_columns = (target, cfg.user)
        self.n_values = int(schema.feature(cfg.attribute).vocab_size)
        self.cfg = cfg
        N, G = int(tf.vocab_size), cfg.folds + 1
        K = min(cfg.k, N)
        self.register_buffer("ids_GNK", torch.full((G, N, K), -1, dtype=torch.int32))
        self.register_buffer("sims_GNK", torch.zeros(G, N, K))
        self.width = self.n_values + 1
        # tables saved before the read-out searched them were ordered by similarity: order them on load
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sort_tables())

    @torch.no_grad()
    def _sort_tables(self) -> None:
        ids, order = self.ids_GNK.sort(-1)
        self.sims_GNK.copy_(self.sims_GNK.gather(-1, order))
        self.ids_GNK.copy_(ids)

    def forward(self, batch: dict[str, torch.Tensor], lookup) -> torch.Tensor:
        ids_BL, a_BL = batch[self.seq], batch[self.attr]
        mask_BL = ids_BL >= 0
        N = self.ids_GNK.shape[1]
        c_B = batch[self.target].clamp(0, N - 1)
        folds = self.ids_GNK.shape[0] - 1
        if self.training:
            g_B = user_fold(batch[self.user], folds)
        else:
            g_B = torch.full_like(c_B, folds)
        nbr_BK, sim_BK = self.ids_GNK[g_B, c_B].long(), self.sims_GNK[g_B, c_B]
        # each item's neighbours are sorted by id: a binary search per position, O(B L log K) and no B x L x K
        # temporary (64 ms -> 1.4 ms per batch at B 512, L 50, K 256); padding (-1) is masked out
        pos_BL = torch.searchsorted(nbr_BK, ids_BL.long()).clamp(max=nbr_BK.shape[1] - 1)
        hit_BL = (nbr_BK.gather(1, pos_BL) == ids_BL) & mask_BL
        s_BL = sim_BK.gather(1, pos_BL) * hit_BL
        den_B1 = s_BL.abs().sum(1, keepdim=True)
        per_value_BV = torch.zeros(s_BL.shape[0], self.n_values, dtype=s_BL.dtype, device=s_BL.device)
        per_value_BV.scatter_add_(1, a_BL.clamp(0, self.n_values - 1), s_BL)
        return torch.cat([per_value_BV / (1 + den_B1), torch.log1p(den_B1)], -1)

    @torch.no_grad()
    def fit_statistics(self, columns: dict[str, np.ndarray], labels: np.ndarray) -> None:
        """Fit the neighbour tables from the training split: `columns` holds the target and user ids per row,
        `labels` the first task's 0/1 label per row."""
        items = np.asarray(columns[self.target], dtype=np.int64)
        users = np.asarray(columns[self.user], dtype=np.int64)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        G, N, K = self.ids_GNK.shape
        if items.size and (items.min() < 0 or items.max() >= N):
            raise ValueError(f"neighbors: '{self.target}' ids must lie in [0, {N}), got {items.min()}..{items.max()}")
        uniq, u_idx = np.unique(users, return_inverse=True)
        fold_of_user = user_fold(uniq, G - 1)
        for g in range(G):
            keep = fold_of_user[u_idx] != g if g < G - 1 else np.ones(len(items), bool)
            ids_NK, sims_NK = _fit(items[keep], u_idx[keep], y[keep], N, len(uniq), K, self.cfg.shrink)
            self.ids_GNK[g] = ids_NK
            self.sims_GNK[g] = sims_NK


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape).coalesce().to_sparse_csr()


def _fit(items, users, y, N: int, U: int, K: int, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K neighbours of every item by |shrunk cosine| of user-centred labels. Repeated (item, user) pairs
    average; an item without co-rated neighbours keeps id -1 and similarity 0 in its empty slots. Sparse
    items x users matrices, multiplied a block of item rows at a time (block x N dense, <= BLOCK_CELLS)."""
    mean_U = np.bincount(users, y, U) / np.maximum(np.bincount(users, minlength=U), 1)
    at = torch.from_numpy(np.stack([items, users]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # sparse CSR "beta" and invariant-check notices
        total = torch.sparse_coo_tensor(at, torch.from_numpy((y - mean_U[users]).astype(np.float32)), (N, U)).coalesce()
        count = torch.sparse_coo_tensor(at, torch.ones(len(items)), (N, U)).coalesce()   # same index order
        ii, uu = total.indices()
        m = total.values() / count.values()
        one = torch.ones_like(m)
        M, MT = _csr(ii, uu, m, (N, U)), _csr(uu, ii, m, (U, N))
        C, CT = _csr(ii, uu, one, (N, U)), _csr(uu, ii, one, (U, N))
        norm_N = torch.zeros(N).index_add_(0, ii, m * m).sqrt().clamp(min=1e-9)
        ids = torch.full((N, K), -1, dtype=torch.int32)
        sims = torch.zeros(N, K)
        step = max(1, BLOCK_CELLS // N)
        for lo in range(0, N, step):
            hi = min(lo + step, N)
            dot = (_rows(M, lo, hi) @ MT).to_dense()
            co = (_rows(C, lo, hi) @ CT).to_dense()
            s = dot / (norm_N[lo:hi, None] * norm_N[None, :]) * co / (co + shrink)
            s[torch.arange(hi - lo), torch.arange(lo, hi)] = 0   # an item is not its own neighbour
            top = s.abs().topk(K, dim=1).indices
            val = s.gather(1, top)
            blk, order = torch.where(val != 0, top, -1).sort(1)   # by id: the read-out searches them
            ids[lo:hi] = blk.to(torch.int32)
            sims[lo:hi] = val.gather(1, order)
    return ids, sims


def _rows(A: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a CSR matrix, as CSR."""
    crow = A.crow_indices()
    a, b = int(crow[lo]), int(crow[hi])
    return torch.sparse_csr_tensor(crow[lo:hi + 1] - a, A.col_indices()[a:b], A.values()[a:b], (hi - lo, A.shape[1]))
