"""Position-aware tokens of a sequence feature (`tokens:` on a sequence feature of the schema).

Legend: B rows, L positions (padded with -1 at the end; most recent valid position last), E item embedding
width, A concatenated attribute embedding width, W position width, Q attention queries, Hs scorer width.

* `PositionEncoder`: p_BLW = MLP([item row, attribute rows]) per valid position, 0 at padding. The MLP is
  nonlinear, so the pairing of an item with its own rating survives any pooling (a sum of separate item
  and rating embeddings would pool into the two separate bags again).
* `SequencePools` (user side, candidate-free): the requested pools of p over valid positions, concatenated,
  plus log(1 + length) / log(1 + max_len) (mean pooling alone hides how long the history is):
  mean; recency (softmax of one learned logit per recency rank); attention (Q learned queries over
  Linear(p), their outputs concatenated and projected to W).
* `TargetAttention` (candidate side): the candidate's item row q_BE is the query; score_j =
  MLP([q, e_j, q * e_j, p_j]); softmax (normalized) or sigmoid gates (mean over valid positions, DIN's
  unnormalized weights); output sum_j a_j p_j. An empty history gives 0.
* `NeighborhoodToken` (candidate side, recmix/models/neighbors.py): fitted item-item similarities of the
  candidate to the history, summed per attribute value (`tokens.neighbors`).
All read only their declared raw columns (`inputs`), so UG-Sep can place them by side; all are
`recmix.models.derived.DerivedFeature`s without a loss of their own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recmix.platform.specs.data import FeatureSchema, SeqPool, TargetAttention

from .derived import DerivedFeature
from .embedding import feature_widths, masked_rows
from .neighbors import NeighborhoodToken
from .token_layers import mlp

NEG = -1e30   # masked score: exp underflows to exactly 0


class PositionEncoder(nn.Module):
    """Item rows and attribute rows of every valid position -> p_BLW (shared by the pools and the target)."""

    def __init__(self, schema: FeatureSchema, seq: str, widths: dict[str, int]):
        super().__init__()
        f = schema.feature(seq)
        self.seq, self.table = seq, f.table_name
        self.attrs = [(a, schema.feature(a).table_name) for a in f.tokens.attributes]
        self.max_len = int(f.max_len)
        self.width = f.tokens.width
        d_in = widths[seq] + sum(widths[a] for a, _ in self.attrs)
        self.mlp = mlp(d_in, self.width, self.width)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.seq, *(a for a, _ in self.attrs))

    def forward(self, batch: dict[str, torch.Tensor], lookup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(e_BLE item rows, p_BLW positions, mask_BL); padding rows are 0 and never reach `lookup`."""
        ids_BL = batch[self.seq]
        mask_BL = ids_BL >= 0
        e_BLE = masked_rows(lookup, self.table, ids_BL)
        parts = [e_BLE]
        for name, table in self.attrs:
            a_BL = batch[name]
            if a_BL.shape != ids_BL.shape or not torch.equal(a_BL >= 0, mask_BL):
                raise ValueError(f"sequence '{name}' is not aligned with '{self.seq}' (an attribute needs one value per "
                                 f"position): shapes {tuple(a_BL.shape)} vs {tuple(ids_BL.shape)}")
            parts.append(masked_rows(lookup, table, a_BL))
        p_BLW = self.mlp(torch.cat(parts, -1)) * mask_BL.unsqueeze(-1)
        return e_BLE, p_BLW, mask_BL


def masked_softmax(s_BXL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Softmax over L of valid positions; a row with none gets all-zero weights (not NaN)."""
    m = mask_BL.unsqueeze(1)
    a = torch.softmax(s_BXL.masked_fill(~m, NEG), -1)
    return a * m


class SequencePools(DerivedFeature):
    """User-side vector of the sequence: the configured pools, concatenated, and the normalized length.
    Name `<sequence>_pooled`, in the sequence's group; reads the sequence and its attributes only."""

    def __init__(self, encoder: PositionEncoder, group: str, pools: list[SeqPool], n_queries: int):
        super().__init__()
        self.name, self.group, self.inputs = f"{encoder.seq}_pooled", group, encoder.inputs
        self.encoder, self.pools = encoder, list(pools)
        W = encoder.width
        if SeqPool.recency in self.pools:
            self.recency_logits = nn.Parameter(torch.zeros(encoder.max_len))
        if SeqPool.attention in self.pools:
            self.queries_QW = nn.Parameter(torch.randn(n_queries, W) / math.sqrt(W))
            self.keys = nn.Linear(W, W)
            self.out = nn.Linear(n_queries * W, W, bias=False)   # no bias: an empty history pools to 0
        self.width = W * len(self.pools) + 1

    def forward(self, batch: dict[str, torch.Tensor], lookup) -> torch.Tensor:
        _, p_BLW, mask_BL = self.encoder(batch, lookup)
        B, L, W = p_BLW.shape
        n_B = mask_BL.sum(1)
        out = []
        for pool in self.pools:
            if pool is SeqPool.mean:
                out.append(p_BLW.sum(1) / n_B.clamp(min=1).unsqueeze(-1).to(p_BLW.dtype))
            elif pool is SeqPool.recency:
                # rank 0 = the last valid position (valid positions form a prefix)
                rank_BL = (n_B.unsqueeze(1) - 1 - torch.arange(L, device=p_BLW.device)).clamp(0, self.encoder.max_len - 1)
                a_BL = masked_softmax(self.recency_logits[rank_BL].unsqueeze(1), mask_BL).squeeze(1)
                out.append(torch.einsum("bl,blw->bw", a_BL, p_BLW))
            else:
                s_BQL = torch.einsum("qw,blw->bql", self.queries_QW, self.keys(p_BLW)) / math.sqrt(W)
                a_BQL = masked_softmax(s_BQL, mask_BL)
                out.append(self.out(torch.einsum("bql,blw->bqw", a_BQL, p_BLW).reshape(B, -1)))
        length_B1 = torch.log1p(n_B.to(p_BLW.dtype)).unsqueeze(-1) / math.log1p(self.encoder.max_len)
        return torch.cat(out + [length_B1], -1)


class TargetAttentionPool(DerivedFeature):
    """Candidate-side vector: the target item's attention over the sequence positions (DIN-style).
    Name `<sequence>_target`, in the target feature's (candidate-side) group."""

    def __init__(self, encoder: PositionEncoder, schema: FeatureSchema, target: str, widths: dict[str, int],
                 mode: TargetAttention, hidden: int):
        super().__init__()
        assert mode is not TargetAttention.none
        tf = schema.feature(target)
        self.name, self.group, self.inputs = f"{encoder.seq}_target", tf.group, (*encoder.inputs, target)
        self.encoder, self.target, self.mode = encoder, target, mode
        self.table = tf.table_name
        E, W = widths[target], encoder.width
        self.scorer = mlp(3 * E + W, hidden, 1)
        self.width = W

    def forward(self, batch: dict[str, torch.Tensor], lookup) -> torch.Tensor:
        e_BLE, p_BLW, mask_BL = self.encoder(batch, lookup)
        q_BE = lookup.lookup(self.table, batch[self.target])
        q_BLE = q_BE.unsqueeze(1).expand_as(e_BLE)
        s_BL = self.scorer(torch.cat([q_BLE, e_BLE, q_BLE * e_BLE, p_BLW], -1)).squeeze(-1)
        if self.mode is TargetAttention.softmax:
            a_BL = masked_softmax(s_BL.unsqueeze(1), mask_BL).squeeze(1)
        else:
            a_BL = torch.sigmoid(s_BL) * mask_BL / mask_BL.sum(1, keepdim=True).clamp(min=1)
        return torch.einsum("bl,blw->bw", a_BL, p_BLW)


def build_sequence_tokens(cfg, schema: FeatureSchema) -> list[DerivedFeature]:
    """The derived features of every sequence feature with `tokens:` (the model config adds nothing yet).
    Both of one sequence share its PositionEncoder (one set of weights on the user and candidate paths)."""
    widths = feature_widths(schema)
    out: list[DerivedFeature] = []
    for f in schema.inputs:
        tok = f.tokens
        if tok is None:
            continue
        if tok.pools or tok.target_attention is not TargetAttention.none:   # the neighbourhood token needs none
            enc = PositionEncoder(schema, f.name, widths)
        if tok.pools:
            out.append(SequencePools(enc, f.group, tok.pools, tok.attention_queries))
        if tok.target_attention is not TargetAttention.none:
            out.append(TargetAttentionPool(enc, schema, tok.target, widths, tok.target_attention, tok.hidden))
        if tok.neighbors is not None:
            out.append(NeighborhoodToken(schema, f.name, tok.neighbors, tok.target))
    return out
