"""FLOPs of one UG-Sep request (one user, C candidates) against the unmasked baseline (spec §5.7).

Counts matmul FLOPs (2 per multiply-add) of the per-token layers: F1/F2 of every block (TokenMixer-Large:
two SwiGLU banks, 6*W*F per row and bank; RankMixer: the GELU FFN, 4*D*F), Information Compensation, and
the per-side chunk tokenizers. With rho = Cu/H = Tu/T the backbone ratio is exactly
    ugsep / baseline = (1 - rho) + rho / C + IC / baseline.
The baseline is the same architecture with no user tokens: C rows through every bank.
"""

from __future__ import annotations


def _ic_flops(model) -> int:
    if model.ic is None:
        return 0
    ic = model.ic[0]
    if ic.proj_kind == "per_head":
        per = 2 * model.Cu * ic.Z * ic.M
    elif ic.proj_kind == "dense":
        per = 2 * model.Cu * ic.Z * ic.G * ic.M
    else:
        r = ic.proj[0].out_features
        per = 2 * (model.Cu * ic.Z * r + r * ic.G * ic.M)
    return per * len(model.blocks)


def _bank_flops(model) -> tuple[int, int]:
    """(FLOPs per row of one F1 bank, of one F2 bank); RankMixer has one FFN per position."""
    blk = model.blocks[0]
    if hasattr(blk, "f1"):
        return 6 * blk.f1.w_in.d_in * blk.f1.hidden, 6 * blk.f2.w_in.d_in * blk.f2.hidden
    return 0, 4 * blk.ffn.w_in.d_in * blk.ffn.w_in.d_out


def _tok_flops(tok) -> int:
    return 0 if tok is None or tok.proj is None else 2 * tok.n_chunk * tok.chunk_dim * tok.proj.d_out


def request_flops(model, n_candidates: int) -> dict:
    C, L = n_candidates, len(model.blocks)
    T, Tu, H, Cu = model.T, model.Tu, model.H, model.Cu
    f1, f2 = _bank_flops(model)
    base = C * L * (H * f1 + T * f2)
    user = L * (Cu * f1 + Tu * f2)
    cand = C * L * ((H - Cu) * f1 + (T - Tu) * f2)
    ic = C * _ic_flops(model)
    rho = Cu / H
    return {
        "baseline_backbone": base,
        "ugsep_backbone": user + cand + ic,
        "user_backbone": user,
        "ic": ic,
        "tokenizer": _tok_flops(getattr(model, "user_tokenizer", None)) + C * _tok_flops(model.cand_tokenizer),
        "ratio": (user + cand + ic) / base,
        "formula": (1 - rho) + rho / C + ic / base,
        "rho": rho,
    }


def config_counts(cfg, schema):
    """(tokenizer, IC) parameter Counts of a `model.ugsep` config, for `recmix.models.counters.model`.

    Mirrors UGSepTokenMixerLarge / UGSepRankMixer: each side's features chunked into its tokens by a
    per-token Linear with bias (one token replaced by the global MLP on its side), and one IC module per
    block.
    """
    from .counters import Counts, _linear, _mlp, feature_widths

    ug, T, D = cfg.ugsep, cfg.n_tokens, cfg.d_model
    H = cfg.resolved_heads(T)
    Tu = ug.user_tokens(T)
    Cu, S = H * Tu // T, D // H
    w = feature_widths(schema)
    user_groups = {g.name for g in schema.groups if g.side.value == "user"} if Tu else set()
    wu = sum(w[f.name] for f in schema.inputs if f.group in user_groups)
    wg = sum(w[f.name] for f in schema.inputs if f.group not in user_groups)
    glob = getattr(cfg, "global_token", None)
    glob = glob is not None and glob.value == "mlp"
    side = ug.global_token_side.value

    def side_counts(width: int, n_tok: int, has_global: bool, global_in: int) -> Counts:
        c = _mlp(global_in, D, D) if has_global else Counts(0, 0, 0)
        n_chunk = n_tok - int(has_global)
        if n_chunk:
            c = c + _linear(-(-width // n_chunk), D).scaled(n_chunk)
        return c

    tok = Counts(0, 0, 0)
    if Tu:
        tok = tok + side_counts(wu, Tu, glob and side == "u", wu)
    tok = tok + side_counts(wg, T - Tu, glob and (side == "g" or not Tu), wu + wg)
    ic = Counts(0, 0, 0)
    if ug.ic_mode.value != "none" and Cu:
        G, M = H - Cu, T * S
        Z = (T - Tu) * S if ug.ic_mode.value == "masked_off" else M
        per = {"per_head": Cu * Z * M, "dense": Cu * Z * G * M,
               "low_rank": Cu * Z * ug.ic_rank + ug.ic_rank * G * M}[ug.ic_proj.value]
        ic = Counts(per, per, 2 * per).scaled(cfg.n_layers)
    return tok, ic
