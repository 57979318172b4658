"""`build_model(cfg, schema)`: the one place a `model:` config turns into a module."""

from __future__ import annotations

from .base import RankingModel


def build_model(cfg, schema, lookup=None) -> RankingModel:
    arch = cfg.arch
    if arch == "tokenmixer_large":
        from .tokenmixer_large import TokenMixerLarge

        return TokenMixerLarge(cfg, schema, lookup)
    if arch == "rankmixer":
        from .rankmixer import RankMixer

        return RankMixer(cfg, schema, lookup)
    if arch == "dlrm_mlp":
        from .dlrm import DLRMMLP

        return DLRMMLP(cfg, schema, lookup)
    raise ValueError(f"unknown model arch '{arch}' (known: dlrm_mlp, rankmixer, tokenmixer_large)")
