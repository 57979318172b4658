"""Ranking models: single-device math (tokenizers, TokenMixer-Large, RankMixer, DLRM, MoE, UG-Sep)."""
