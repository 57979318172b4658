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


def _norm(kind: str, width: int) -> int:
    return width if kind == "rmsnorm" else 2 * width


def _swiglu(banks: int, width: int, hidden: int) -> Counts:
    mm = banks * 3 * width * hidden
    return Counts(mm, mm, 2 * mm)


def _sp_moe(banks: int, width: int, hidden: int, moe) -> Counts:
    ew = hidden // moe.n_experts
    shared_w = {"narrow": ew, "full": hidden, "none": 0}[moe.shared_expert.value]
    router = banks * width * moe.n_routed
    routed_all = banks * moe.n_routed * 3 * width * ew
    routed_active = banks * moe.n_routed_active * 3 * width * ew
    shared = banks * 3 * width * shared_w
    active = shared + routed_active + router
    return Counts(routed_all + shared + router, active, 2 * active)


def tokenmixer_block(cfg, n_tokens: int) -> Counts:
    T, D = n_tokens, cfg.d_model
    H = cfg.resolved_heads(T)
    M = T * D // H
    n = cfg.ffn_mult
    h1, h2 = int(round(n * M)), int(round(n * D))
    moe = cfg.moe
    pos = moe.positions.value if moe is not None else None
    f1 = _sp_moe(H, M, h1, moe) if pos in ("both", "mixed") else _swiglu(H, M, h1)
    f2 = _sp_moe(T, D, h2, moe) if pos in ("both", "token") else _swiglu(T, D, h2)
    norms = _norm(cfg.norm.value, M if cfg.residual_mode.value == "A" else D) + _norm(cfg.norm.value, D)
    return f1 + f2 + Counts(norms, norms, 0)


def rankmixer_block(cfg, n_tokens: int) -> Counts:
    T, D = n_tokens, cfg.d_model
    kD = cfg.hidden()
    norms = 2 * _norm(cfg.norm.value, D)
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
    routers = T * (D + 1) * E * (1 if moe.dtsi.value == "off" else 2)
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


def feature_widths(schema) -> dict[str, int]:
    return {f.name: (int(f.embedding_dim) if f.type.value != "dense" else f.dim) for f in schema.inputs}


def n_tokens_for(cfg, schema) -> int:
    if cfg.tokenizer.value == "group_mlp":
        glob = getattr(cfg, "global_token", None)
        return len(schema.groups) + int(glob is not None and glob.value == "mlp")
    return cfg.n_tokens


def tokenizer(cfg, schema) -> Counts:
    w = feature_widths(schema)
    D, total = cfg.d_model, sum(w.values())
    kind = cfg.tokenizer.value
    if kind == "group_mlp":
        c = Counts(0, 0, 0)
        for g in schema.groups:
            c = c + _mlp(sum(w[f.name] for f in schema.group_features(g.name)), D, D)
        glob = getattr(cfg, "global_token", None)
        if glob is not None and glob.value == "mlp":
            c = c + _mlp(total, D, D)
        return c
    T = cfg.n_tokens
    d = cfg.chunk_dim or -(-total // T)
    one = _linear(d, D)
    if kind == "chunk_shared":
        # the shared Linear's weights are stored once but applied T times
        return Counts(one.params, one.params, one.flops * T)
    return one.scaled(T)


def embeddings(schema) -> int:
    seen: dict[str, int] = {}
    for f in schema.inputs:
        if f.type.value != "dense":
            seen[f.table_name] = f.n_ids * int(f.embedding_dim)
    return sum(seen.values())


def model(cfg, schema) -> dict:
    """Counts of a whole model on a schema: embeddings, tokenizer, backbone, heads (+ aux towers)."""
    K = len(schema.labels)
    if cfg.arch == "dlrm_mlp":
        width = sum(feature_widths(schema).values())
        body = Counts(0, 0, 0)
        for h in cfg.hidden:
            body, width = body + _linear(width, h), h
        heads, tok = _heads(width, K, cfg.head_hidden), Counts(0, 0, 0)
    else:
        T = n_tokens_for(cfg, schema)
        tok, body = tokenizer(cfg, schema), backbone(cfg, T)
        if getattr(cfg, "ugsep", None) is not None:
            from .ugsep_counters import config_counts

            tok, ic = config_counts(cfg, schema)
            body = body + ic
        heads = _heads(cfg.d_model, K, cfg.head_hidden)
        if cfg.arch == "tokenmixer_large":
            heads = heads + _heads(cfg.d_model, K, cfg.head_hidden).scaled(len(cfg.aux_layers()))
    dense = tok + body + heads
    return {"embedding_params": embeddings(schema), "tokenizer": tok.asdict(), "backbone": body.asdict(),
            "heads": heads.asdict(), "dense": dense.asdict()}
