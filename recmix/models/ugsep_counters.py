"""FLOPs of one UG-Sep request (one user, C candidates) against the unmasked baseline (spec §5.7).

Counts matmul FLOPs (2 per multiply-add) of the per-token layers: F1/F2 of every block (TokenMixer-Large:
two SwiGLU banks, 6*W*F per row and bank; RankMixer: the GELU FFN, 4*D*F), Information Compensation, and
the per-side chunk tokenizers. With rho = Cu/H = Tu/T the backbone ratio is exactly
    ugsep / baseline = (1 - rho) + rho / C + IC / baseline.
The baseline is the same architecture with no user tokens: C rows through every bank. Parameter counts
of a UG-Sep config (no model needed) are `recmix.models.counters.ugsep_counts`.
"""

from __future__ import annotations

from recmix.platform.specs.ugsep import ICProj


def _ic_flops(model) -> int:
    if model.ic is None:
        return 0
    ic = model.ic[0]
    if ic.proj_kind is ICProj.per_head:
        per = 2 * model.Cu * ic.Z * ic.M
    elif ic.proj_kind is ICProj.dense:
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
