"""FLOPs of one UG-Sep request (one user, C candidates) against the unmasked baseline (spec §5.7).

Measured, not derived: torch's FlopCounterMode counts the matmul FLOPs (2 per multiply-add) that a
meta-device copy of the model issues (no data, no time), so what is counted is what the blocks run:
  user_backbone   the user paths, once per request
  ugsep_backbone  that + the candidate paths for C rows, Information Compensation included (`ic`)
  baseline        the same blocks unmasked (their full forward) on C rows of all T tokens
  tokenizer       both side tokenizers (chunk projections and a global MLP)
With rho = Cu/H = Tu/T the backbone ratio is exactly (1 - rho) + rho / C + IC / baseline (`formula`;
the tests check both against the FLOPs the per-token kernels report).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def request_flops(model, n_candidates: int) -> dict:
    assert model.ug is not None, "request_flops needs a model with ugsep"
    C, m = n_candidates, copy.deepcopy(model).to("meta")
    meta = dict(device="meta", dtype=next(m.parameters()).dtype)
    w = m.encoder.widths
    f_UW = torch.empty(1, sum(w[n] for n in m.user_feats), **meta)
    f_BW = torch.empty(C, sum(w[n] for n in m.cand_feats), **meta)
    extra = f_UW.expand(C, -1) if m.Tu and m.cand_tokenizer.global_mlp is not None else None
    x: dict = {}
    tok = _flops(lambda: x.update(u=m.user_tokenizer(f_UW) if m.Tu else None, g=m.cand_tokenizer(f_BW, extra)))
    base = _flops(lambda: m.backbone(torch.empty(C, m.T, m.D, **meta)))
    user = cand = ic = 0
    if m.Tu:
        state = m.user_stack(f_UW, x["u"])
        user = _flops(lambda: m.user_stack(f_UW, x["u"]))
        user_index = torch.zeros(C, dtype=torch.long, device="meta")
        cand = _flops(lambda: m.candidate_stack(state, x["g"], user_index))
        ic = cand - _flops(lambda: m.candidate_stack(state, x["g"], user_index, with_ic=False))
    else:
        cand = _flops(lambda: m.backbone(x["g"]))
    rho = m.Cu / m.H
    return {
        "baseline_backbone": base,
        "ugsep_backbone": user + cand,
        "user_backbone": user,
        "ic": ic,
        "tokenizer": tok,
        "ratio": (user + cand) / base,
        "formula": (1 - rho) + rho / C + ic / base,
        "rho": rho,
    }
