"""Parameter and FLOP counts from a `model:` config alone (no tensors), matching spec §3.3 and §4.4.

Conventions: forward FLOPs per sample = 2 x active matmul parameters (2 FLOPs per multiply-add; biases,
norms, activations and routing softmax not counted). "Dense params" exclude embedding tables. MoE layers
count every expert in `params` and only the active ones (shared + top-(K-1), or ratio * experts for the
ReLU MoE) in `active_params` / `flops`; routers are matmuls and count in both.

Closed forms (tested against the modules):
  RankMixer block     T*(2kD^2 + kD + D) + norm params (LayerNorm 4D);  FLOPs 4kTD^2
  TokenMixer-L block  3n*T*D^2*(T/H + 1) + norm gains (RMSNorm 2D in modes B/C);  FLOPs 6n*T*D^2*(T/H + 1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recmix.platform.specs.data import GroupSide
from recmix.platform.specs.model import (DTSICoupling, GlobalToken, MoEPositions, Norm, ResidualMode, SharedExpert,
                                         Tokenizer)
from recmix.platform.specs.ugsep import GlobalTokenSide, ICMode, ICProj

from .derived import derived_tables
from .derived_registry import build_derived
from .embedding import feature_widths, tables_from_schema
from .tokenizers import ordered_features


@dataclass
class Counts:
    params: int           # all parameters of the part counted
    active_params: int    # parameters touched per sample (MoE: active experts only)
    flops: int            # forward FLOPs per sample = 2 x active matmul params

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(self.params + o.params, self.active_params + o.active_params, self.flops + o.flops)

    def scaled(self, k: int) -> "Counts":
        return Counts(self.params * k, self.active_params * k, self.flops * k)

    def asdict(self) -> dict:
        return asdict(self)


def _norm(kind: Norm, width: int) -> int:
    return width if kind is Norm.rmsnorm else 2 * width


def _swiglu(banks: int, width: int, hidden: int) -> Counts:
    mm = banks * 3 * width * hidden
    return Counts(mm, mm, 2 * mm)


def _sp_moe(banks: int, width: int, hidden: int, moe) -> Counts:
    ew = hidden // moe.n_experts
    shared_w = {SharedExpert.narrow: ew, SharedExpert.full: hidden, SharedExpert.none: 0}[moe.shared_expert]
    router = banks * width * moe.n_routed
    routed_all = banks * moe.n_routed * 3 * width * ew
    routed_active = banks * moe.n_routed_active * 3 * width * ew
    shared = banks * 3 * width * shared_w
    active = shared + routed_active + router
    return Counts(routed_all + shared + router, active, 2 * active)


def tokenmixer_block(cfg, n_tokens: int) -> Counts:
    T, D = n_tokens, cfg.d_model
    H = cfg.resolved_heads(T)
    M = cfg.mixed_width(T)
    n = cfg.ffn_mult
    h1, h2 = int(round(n * M)), int(round(n * D))
    f1 = _sp_moe(H, M, h1, cfg.moe) if cfg.moe_at(MoEPositions.mixed) else _swiglu(H, M, h1)
    f2 = _sp_moe(T, D, h2, cfg.moe) if cfg.moe_at(MoEPositions.token) else _swiglu(T, D, h2)
    norms = _norm(cfg.norm, M if cfg.residual_mode is ResidualMode.A else D) + _norm(cfg.norm, D)
    return f1 + f2 + Counts(norms, norms, 0)


def rankmixer_block(cfg, n_tokens: int) -> Counts:
    T, D = n_tokens, cfg.d_model
    kD = cfg.hidden()
    norms = 2 * _norm(cfg.norm, D)
    bias = cfg.ffn_bias
    if cfg.moe is None:
        mm = T * 2 * D * kD
        p = mm + (T * (kD + D) if bias else 0)
        return Counts(p + norms, p + norms, 2 * mm)
    moe = cfg.moe
    E = moe.n_experts
    eh = kD if moe.expert_hidden == "full" else kD // E
    per_expert_mm = 2 * D * eh
    per_expert = per_expert_mm + ((eh + D) if bias else 0)
    routers = T * (D + 1) * E * (1 if moe.dtsi is DTSICoupling.off else 2)
    infer_router = T * D * E
    # Active experts at inference: the target ratio (capped by max_active_infer) of each token's E experts.
    active_e = E * moe.target_active_ratio
    if moe.max_active_infer is not None:
        active_e = min(active_e, moe.max_active_infer)
    active_mm = int(round(T * active_e * per_expert_mm)) + infer_router
    p = T * E * per_expert + routers
    return Counts(p + norms, int(round(T * active_e * per_expert)) + infer_router + T * E + norms, 2 * active_mm)


def backbone(cfg, n_tokens: int) -> Counts:
    """All blocks of a rankmixer / tokenmixer_large config for T = n_tokens."""
    block = tokenmixer_block if cfg.arch == "tokenmixer_large" else rankmixer_block
    return block(cfg, n_tokens).scaled(cfg.n_layers)


def _linear(i: int, o: int, bias: bool = True) -> Counts:
    return Counts(i * o + (o if bias else 0), i * o + (o if bias else 0), 2 * i * o)


def _mlp(i: int, h: int, o: int) -> Counts:
    return _linear(i, h) + _linear(h, o)


def _heads(d: int, n_tasks: int, hidden) -> Counts:
    return _mlp(d, hidden or max(1, d // 2), 1).scaled(n_tasks)


def _has_global(cfg) -> bool:
    return getattr(cfg, "global_token", None) is GlobalToken.mlp


def n_tokens_for(cfg, schema) -> int:
    if cfg.tokenizer is Tokenizer.group_mlp:
        return len(schema.groups) + int(_has_global(cfg))
    return cfg.n_tokens


def tokenizer(cfg, schema, derived=()) -> Counts:
    w = _widths(schema, derived)
    D, total = cfg.d_model, sum(w.values())
    if cfg.tokenizer is Tokenizer.group_mlp:
        c = Counts(0, 0, 0)
        for _, names in ordered_features(schema, derived):
            c = c + _mlp(sum(w[n] for n in names), D, D)
        if _has_global(cfg):
            c = c + _mlp(total, D, D)
        return c
    T = cfg.n_tokens
    d = cfg.chunk_dim or -(-total // T)
    one = _linear(d, D)
    if cfg.tokenizer is Tokenizer.chunk_shared:
        # the shared Linear's weights are stored once but applied T times
        return Counts(one.params, one.params, one.flops * T)
    return one.scaled(T)


def _widths(schema, derived) -> dict[str, int]:
    return feature_widths(schema) | {d.name: d.width for d in derived}


def derived_counts(derived) -> Counts:
    """The derived features' own dense parameters (their lookup tables are embeddings). FLOPs: one
    application per row, so a module applied per history position is undercounted by the history length."""
    n = sum(p.numel() for d in derived for p in d.parameters())
    return Counts(n, n, 2 * n)


def embeddings(schema) -> int:
    return sum(t.n_ids * t.dim for t in tables_from_schema(schema).values())


def ugsep_counts(cfg, schema, derived=()) -> tuple[Counts, Counts]:
    """(tokenizer, IC) Counts of a model with `ugsep`: each side's features chunked into its tokens by a
    per-token Linear with bias (one token replaced by the global MLP on its side), one IC module per block."""
    ug, T, D = cfg.ugsep, cfg.n_tokens, cfg.d_model
    H = cfg.resolved_heads(T)
    Tu = ug.n_user_tokens(T)
    Cu, S = H * Tu // T, D // H
    w = _widths(schema, derived)
    user_groups = {g.name for g in schema.groups if g.side is GroupSide.user} if Tu else set()
    groups = ordered_features(schema, derived)
    wu = sum(w[n] for g, names in groups if g in user_groups for n in names)
    wg = sum(w[n] for g, names in groups if g not in user_groups for n in names)
    glob, user_side = _has_global(cfg), ug.global_token_side is GlobalTokenSide.user

    def side_counts(width: int, n_tok: int, has_global: bool, global_in: int) -> Counts:
        c = _mlp(global_in, D, D) if has_global else Counts(0, 0, 0)
        n_chunk = n_tok - int(has_global)
        if n_chunk:
            c = c + _linear(-(-width // n_chunk), D).scaled(n_chunk)
        return c

    tok = Counts(0, 0, 0)
    if Tu:
        tok = tok + side_counts(wu, Tu, glob and user_side, wu)
    tok = tok + side_counts(wg, T - Tu, glob and (not user_side or not Tu), wu + wg)
    ic = Counts(0, 0, 0)
    if ug.ic_mode is not ICMode.none and Cu:
        G, M = H - Cu, T * S
        Z = (T - Tu) * S if ug.ic_mode is ICMode.masked_off else M
        per = {ICProj.per_head: Cu * Z * M, ICProj.dense: Cu * Z * G * M,
               ICProj.low_rank: Cu * Z * ug.low_rank + ug.low_rank * G * M}[ug.ic_proj]
        ic = Counts(per, per, 2 * per).scaled(cfg.n_layers)
    return tok, ic


def model(cfg, schema) -> dict:
    """Counts of a whole model on a schema: embeddings, tokenizer, backbone, heads (+ aux towers)."""
    K = len(schema.labels)
    derived = build_derived(cfg, schema)
    if cfg.arch == "dlrm_mlp":
        width = sum(_widths(schema, derived).values())
        body = Counts(0, 0, 0)
        for h in cfg.hidden:
            body, width = body + _linear(width, h), h
        heads, tok = _heads(width, K, cfg.head_hidden), Counts(0, 0, 0)
    else:
        T = n_tokens_for(cfg, schema)
        tok, body = tokenizer(cfg, schema, derived), backbone(cfg, T)
        if getattr(cfg, "ugsep", None) is not None:
            tok, ic = ugsep_counts(cfg, schema, derived)
            body = body + ic
        heads = _heads(cfg.d_model, K, cfg.head_hidden)
        if cfg.arch == "tokenmixer_large":
            heads = heads + _heads(cfg.d_model, K, cfg.head_hidden).scaled(len(cfg.aux_layers()))
    der = derived_counts(derived)
    dense = tok + body + heads + der
    return {"embedding_params": embeddings(schema) + sum(t.n_ids * t.dim for t in derived_tables(derived).values()),
            "derived": der.asdict(), "tokenizer": tok.asdict(), "backbone": body.asdict(),
            "heads": heads.asdict(), "dense": dense.asdict()}
