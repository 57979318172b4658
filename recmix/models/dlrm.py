"""DLRM-MLP baseline: every feature's embedding (pooled for lists) concatenated into one ReLU MLP.

Legend: B batch, S concatenated feature width, K tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelOutput, RankingModel, TaskHeads
from .derived_registry import build_derived


class DLRMMLP(RankingModel):
    def __init__(self, cfg, schema, lookup=None):
        super().__init__(schema, cfg.embedding, lookup, build_derived(cfg, schema))
        self.names = [f.name for f in schema.inputs] + [d.name for d in self.encoder.derived]
        width = sum(self.encoder.widths[n] for n in self.names)
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.heads = TaskHeads(width, len(self.label_names), cfg.head_hidden)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        feats = self.encoder(batch)
        x_BS = torch.cat([feats[n] for n in self.names], dim=-1)
        return self.with_derived_loss(ModelOutput(self.heads(self.mlp(x_BS))))
