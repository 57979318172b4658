"""LMN product-key memory (spec storage.md §7.2, product keys after arXiv 1907.05242).

Legend: Q queries (any leading dims ... before them, e.g. heads), N sub-keys per axis (n_sub), H half key
width (d_key / 2), k per-axis top-k (k_axis), K slots read per query (top_k), M composite keys (N * N),
A heads, I query input width, V value width (d_value), B batch rows, S behaviour positions.

Slots are the N * N composite keys [C1_i; C2_j], slot id i * N + j; a query q = [q1; q2] scores slot
(i, j) as q1.C1_i + q2.C2_j. Product-key search takes the top-k of each axis and the top-K of their k * k
sums: with k >= K it returns the brute-force top-K, since a slot in the top-K has at most K - 1 better
rows on each axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.data import FeatureType, GroupSide
from recmix.platform.specs.memory import MemoryConfig, QueryNorm

from .derived import DerivedFeature
from .embedding import EmbeddingLookup, TableSpec, masked_rows

# The value table's name in every lookup backend (local tables, memory shards, the artifact snapshot).
VALUE_TABLE = "lmn_values"
# The read-out's feature name in the encoder output.
READOUT_NAME = "lmn_memory"


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


def memory_tables(model_cfg) -> dict[str, TableSpec]:
    """{VALUE_TABLE: its TableSpec} when the model has `memory:`, else {} (slot ids are never hashed); what a
    parameter-server or snapshot lookup must serve beside the schema's tables."""
    mem = getattr(model_cfg, "memory", None)
    return {} if mem is None else {VALUE_TABLE: TableSpec(VALUE_TABLE, mem.n_slots, mem.d_value, False)}


def build_memory(model_cfg, schema) -> list["MemoryReadout"]:
    """The `recmix.models.derived` builder: the read-out when the model has `memory:`."""
    mem = getattr(model_cfg, "memory", None)
    return [] if mem is None else [MemoryReadout(mem, schema)]


class ProductKeyMemory(nn.Module):
    """Query inputs (Q, I) -> memory reads (Q, V): q = norm(W_q x) per head, product-key top-K, softmax
    weights, weighted sum of the K value rows fetched from `lookup` by slot id; heads share the values and
    their reads are summed. Sub-keys and W_q are dense parameters; the values live in the lookup."""

    def __init__(self, cfg: MemoryConfig, d_in: int):
        super().__init__()
        self.cfg = cfg
        A, Dk = cfg.heads, cfg.d_key
        self.w_q = nn.Linear(d_in, A * Dk)
        if cfg.query_norm is QueryNorm.layernorm:   # LayerNorm with one affine bank per head
            self.q_scale_AD = nn.Parameter(torch.ones(A, Dk))
            self.q_shift_AD = nn.Parameter(torch.zeros(A, Dk))
        # keys ~ N(0, 1/H): a normalised query scores each axis ~ N(0, 1)
        self.c1_ANH = nn.Parameter(torch.randn(A, cfg.n_sub, Dk // 2) / math.sqrt(Dk // 2))
        self.c2_ANH = nn.Parameter(torch.randn(A, cfg.n_sub, Dk // 2) / math.sqrt(Dk // 2))

    def query(self, x_QI: torch.Tensor) -> torch.Tensor:
        """(A, Q, d_key) queries."""
        q_QAD = self.w_q(x_QI).unflatten(-1, (self.cfg.heads, self.cfg.d_key))
        if self.cfg.query_norm is QueryNorm.layernorm:
            q_QAD = F.layer_norm(q_QAD, (self.cfg.d_key,)) * self.q_scale_AD + self.q_shift_AD
        return q_QAD.transpose(0, 1)

    def slots(self, x_QI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_AQK, slots_AQK): softmax over each head's top-K scores, and the slot ids read."""
        q_AQD = self.query(x_QI)
        Hh = self.cfg.d_key // 2
        s_AQK, slots_AQK = product_key_topk(q_AQD[..., :Hh], q_AQD[..., Hh:], self.c1_ANH, self.c2_ANH,
                                            self.cfg.k_axis, self.cfg.top_k)
        return s_AQK.softmax(-1), slots_AQK

    def forward(self, x_QI: torch.Tensor, lookup: EmbeddingLookup) -> torch.Tensor:
        w_AQK, slots_AQK = self.slots(x_QI)
        v_AQKV = lookup.lookup(VALUE_TABLE, slots_AQK)
        return (w_AQK.unsqueeze(-2) @ v_AQKV).squeeze(-2).sum(0)


class MemoryReadout(DerivedFeature):
    """LMN as a user-side derived feature: one memory read per behaviour of the user's sequence, the reads
    mean-pooled over the non-padded positions into a (B, d_value) vector of the sequence's group.

    Query input of behaviour b of user u: [e_b; e_u] (item row of b, user feature rows). Memory loss of the
    last training forward: lambda_mem * mean over queried positions and value dims of
    SmoothL1_beta(m_b - sg(y_b)), y_b = LN(W_y [e_b; e_u; a_b]) (a_b: side-sequence rows of b, e.g. its
    rating). The stop-gradient leaves W_y nothing to learn, so it is a fixed random projection (a buffer,
    saved with the model); e_b, e_u and a_b still train through the ranking loss. The LayerNorm (no affine)
    makes the target scale-free: embedding rows start at std 0.01, where an unnormalised target puts the
    loss at ~1e-5 and lambda_mem would mean nothing.
    """

    def __init__(self, cfg: MemoryConfig, schema):
        super().__init__()
        self.cfg = cfg
        seq = _feature(schema, cfg.sequence, "memory.sequence")
        if seq.type is not FeatureType.sequence:
            raise ValueError(f"memory.sequence '{seq.name}' must be a sequence feature, got type {seq.type.value}")
        sides = {g.name: g.side for g in schema.groups}
        if sides[seq.group] is not GroupSide.user:
            raise ValueError(f"memory.sequence '{seq.name}' sits in candidate-side group '{seq.group}': the memory "
                             f"read-out is a user-side feature")
        self.users = [_feature(schema, n, "memory.user_features") for n in cfg.user_features]
        for f in self.users:
            if f.type not in (FeatureType.categorical, FeatureType.dense) or sides[f.group] is not GroupSide.user:
                raise ValueError(f"memory.user_features: '{f.name}' must be a categorical or dense feature of a "
                                 f"user-side group (got {f.type.value} in group '{f.group}')")
        self.side = [_feature(schema, n, "memory.side_sequences") for n in cfg.side_sequences]
        for f in self.side:
            if f.type is not FeatureType.sequence or f.max_len != seq.max_len or sides[f.group] is not GroupSide.user:
                raise ValueError(f"memory.side_sequences: '{f.name}' must be a user-side sequence aligned with "
                                 f"'{seq.name}' (max_len {seq.max_len}), got {f.type.value} max_len {f.max_len} "
                                 f"in group '{f.group}'")
        self.seq = seq
        self.name, self.group, self.width = READOUT_NAME, seq.group, cfg.d_value
        self.inputs = tuple(f.name for f in (seq, *self.users, *self.side))
        d_q = int(seq.embedding_dim) + sum(_width(f) for f in self.users)
        d_y = d_q + sum(int(f.embedding_dim) for f in self.side)
        self.memory = ProductKeyMemory(cfg, d_q)
        self.register_buffer("w_y_YV", torch.randn(d_y, cfg.d_value) / math.sqrt(d_y))
        self.tables = {VALUE_TABLE: TableSpec(VALUE_TABLE, cfg.n_slots, cfg.d_value, False)}

    def forward(self, batch: dict[str, torch.Tensor], lookup: EmbeddingLookup) -> torch.Tensor:
        ids_BS = batch[self.seq.name]
        valid_BS = ids_BS >= 0
        b_Q, s_Q = (valid_BS if self.cfg.mask_padding else torch.ones_like(valid_BS)).nonzero(as_tuple=True)
        e_b_QE = masked_rows(lookup, self.seq.table_name, ids_BS[b_Q, s_Q])
        e_u_BU = torch.cat([self._user(f, batch, lookup, self.training) for f in self.users], -1) if self.users \
            else e_b_QE.new_zeros((ids_BS.shape[0], 0))
        x_QI = torch.cat([e_b_QE, e_u_BU[b_Q]], -1)
        m_QV = self.memory(x_QI, lookup)
        keep_Q = valid_BS[b_Q, s_Q]
        B, V = ids_BS.shape[0], self.cfg.d_value
        sum_BV = m_QV.new_zeros((B, V)).index_add(0, b_Q[keep_Q], m_QV[keep_Q])
        out_BV = sum_BV / valid_BS.sum(1, keepdim=True).clamp(min=1).to(sum_BV.dtype)
        self._last_loss = None
        if self.training and self.cfg.lambda_mem > 0 and m_QV.shape[0]:
            a = [masked_rows(lookup, f.table_name, batch[f.name][b_Q, s_Q]) for f in self.side]
            y_QV = F.layer_norm(torch.cat([x_QI, *a], -1) @ self.w_y_YV, (self.cfg.d_value,)).detach()
            self._last_loss = self.cfg.lambda_mem * F.smooth_l1_loss(m_QV, y_QV, beta=self.cfg.smooth_l1_beta)
        return out_BV

    @staticmethod
    def _user(f, batch: dict[str, torch.Tensor], lookup: EmbeddingLookup, training: bool) -> torch.Tensor:
        """e_u's part from feature f, with the feature's `train_dropout` as the encoder applies it (whole rows):
        the memory must not hand the model an id the schema drops to generalise to unseen users."""
        x = batch[f.name]
        e_BU = x.to(torch.float32).reshape(x.shape[0], f.dim) if f.type is FeatureType.dense else lookup.lookup(f.table_name, x)
        if f.train_dropout and training:
            e_BU = e_BU * (torch.rand(x.shape[0], 1, device=x.device) >= f.train_dropout)
        return e_BU


def _feature(schema, name: str, field: str):
    try:
        return schema.feature(name)
    except KeyError:
        known = [f.name for f in schema.inputs]
        raise ValueError(f"{field}: no feature '{name}' in the feature schema (known: {', '.join(known)})") from None


def _width(f) -> int:
    return f.dim if f.type is FeatureType.dense else int(f.embedding_dim)
