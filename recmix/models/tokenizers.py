"""Tokenizers: feature vectors -> T tokens of width D (spec §2.1).

Legend: B batch, T tokens, D token width, d chunk width, Σ concatenated feature width.

* `group_mlp` (TokenMixer-Large): token i = MLP_i(concat of group i's features), MLP = Linear -> SiLU ->
  Linear with zero-initialized biases; with `global_token=mlp` a global token MLP_g(concat of all groups) is
  prepended (T = groups + 1).
* `chunk_shared` / `chunk_per_token` (RankMixer): concat all features in schema group order, zero-pad to
  T*d, cut into T chunks of d, project each with one shared Linear(d -> D) or a per-token Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recmix.platform.specs.model import GlobalToken, InitDist, Tokenizer

from .token_layers import PerTokenLinear, mlp


def ordered_features(schema, derived=()) -> list[tuple[str, list[str]]]:
    """[(group, [feature names])] in the schema's group order, features in declaration order, then the
    group's derived features."""
    return [(g.name, [f.name for f in schema.group_features(g.name)] + [d.name for d in derived if d.group == g.name])
            for g in schema.groups]


class GroupMLPTokenizer(nn.Module):
    def __init__(self, groups: list[tuple[str, list[str]]], widths: dict[str, int], d_model: int, global_token: bool):
        super().__init__()
        self.groups = groups
        self.mlps = nn.ModuleList([mlp(sum(widths[n] for n in names), d_model, d_model) for _, names in groups])
        total = sum(widths[n] for _, names in groups for n in names)
        self.global_mlp = mlp(total, d_model, d_model) if global_token else None
        self.n_tokens = len(groups) + int(global_token)
        # [choice] zero biases: with torch's default bias init a token starts as a constant (rms ~0.1) that
        # dwarfs its input (embeddings of std 0.01 give ~0.001), the blocks' RMSNorm scales that constant to 1,
        # and the embeddings get ~10x less gradient than through chunk tokens (measured: docs/models.md).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [torch.cat([feats[n] for n in names], dim=-1) for _, names in self.groups]
        toks = [m(p) for m, p in zip(self.mlps, parts)]
        if self.global_mlp is not None:
            toks.insert(0, self.global_mlp(torch.cat(parts, dim=-1)))
        return torch.stack(toks, dim=1)


class ChunkTokenizer(nn.Module):
    def __init__(self, groups: list[tuple[str, list[str]]], widths: dict[str, int], d_model: int, n_tokens: int,
                 per_token: bool, chunk_dim: int | None = None):
        super().__init__()
        self.names = [n for _, names in groups for n in names]
        total = sum(widths[n] for n in self.names)
        self.n_tokens = n_tokens
        self.chunk_dim = chunk_dim or math.ceil(total / n_tokens)
        if self.chunk_dim * n_tokens < total:
            raise ValueError(f"chunk_dim ({self.chunk_dim}) * n_tokens ({n_tokens}) < concatenated feature width ({total})")
        self.pad = self.chunk_dim * n_tokens - total
        self.proj = PerTokenLinear(n_tokens, self.chunk_dim, d_model, bias=True) if per_token else nn.Linear(self.chunk_dim, d_model)
        if per_token:
            self.proj.reset_parameters(InitDist.xavier_uniform, 1.0)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        e_BS = F.pad(torch.cat([feats[n] for n in self.names], dim=-1), (0, self.pad))
        x_BTd = e_BS.reshape(e_BS.shape[0], self.n_tokens, self.chunk_dim)
        return self.proj(x_BTd)


def build_tokenizer(cfg, schema, widths: dict[str, int], derived=()) -> nn.Module:
    groups = ordered_features(schema, derived)
    if cfg.tokenizer is Tokenizer.group_mlp:
        tok = GroupMLPTokenizer(groups, widths, cfg.d_model, getattr(cfg, "global_token", None) is GlobalToken.mlp)
        if cfg.n_tokens is not None and cfg.n_tokens != tok.n_tokens:
            raise ValueError(f"group_mlp gives {tok.n_tokens} tokens ({len(groups)} groups"
                             f"{' + global' if tok.global_mlp is not None else ''}) but n_tokens is {cfg.n_tokens}")
        return tok
    return ChunkTokenizer(groups, widths, cfg.d_model, cfg.n_tokens, cfg.tokenizer is Tokenizer.chunk_per_token, cfg.chunk_dim)
