"""What every ranking model shares: embeddings, task heads, the output record and the loss.

Legend: B batch rows, K tasks (labels), D pooled width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .derived import derived_tables, total_loss
from .embedding import EmbeddingLookup, FeatureEncoder, LocalEmbeddingLookup, tables_from_schema
from .token_layers import mlp


@dataclass
class ModelOutput:
    logits_BK: torch.Tensor                                       # what serving scores with
    aux_logits: list[torch.Tensor] = field(default_factory=list)  # deep-supervision towers, (B, K) each
    extra_loss: torch.Tensor | None = None                        # routing regularisers, already weighted
    derived_loss: torch.Tensor | None = None                      # derived features' own losses (LMN memory), weighted


class TaskHeads(nn.Module):
    """One MLP D -> D/2 -> 1 per task on the pooled vector."""

    def __init__(self, d: int, n_tasks: int, hidden: int | None = None):
        super().__init__()
        self.heads = nn.ModuleList([mlp(d, hidden or max(1, d // 2), 1, nn.ReLU()) for _ in range(n_tasks)])

    def forward(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(pooled_BD) for h in self.heads], dim=-1)


class RankingModel(nn.Module):
    """Base: `forward(batch) -> ModelOutput`, `loss(out, labels_BK) -> (total, parts)`."""

    aux_weight: float = 0.0

    def __init__(self, schema, emb_cfg, lookup: EmbeddingLookup | None = None, derived=()):
        super().__init__()
        self.schema = schema
        self.label_names = [f.name for f in schema.labels]
        if lookup is None:
            lookup = LocalEmbeddingLookup(tables_from_schema(schema) | derived_tables(derived), emb_cfg.init_std)
        self.encoder = FeatureEncoder(schema, lookup, emb_cfg.seq_pooling, derived)

    def with_derived_loss(self, out: ModelOutput) -> ModelOutput:
        """`out` with the derived features' losses of this forward attached."""
        out.derived_loss = total_loss(self.encoder.derived)
        return out

    def loss(self, out: ModelOutput, labels_BK: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE summed over tasks, + aux-tower BCE * aux_weight (deep supervision), + routing terms, + derived
        features' losses."""
        main = F.binary_cross_entropy_with_logits(out.logits_BK, labels_BK, reduction="none").mean(0).sum()
        total = main
        parts = {"bce": float(main.detach())}
        if out.aux_logits:
            aux = sum(F.binary_cross_entropy_with_logits(z, labels_BK, reduction="none").mean(0).sum() for z in out.aux_logits)
            total = total + self.aux_weight * aux
            parts["aux_bce"] = float(aux.detach())
        if out.extra_loss is not None:
            total = total + out.extra_loss
            parts["routing"] = float(out.extra_loss.detach())
        if out.derived_loss is not None:
            total = total + out.derived_loss
            parts["derived"] = float(out.derived_loss.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def extra_metrics(self) -> dict[str, float]:
        """Model-internal statistics of the last forward (expert usage, ...)."""
        return {}
