"""Warm start: a model's initial weights from another run's state_dict, S-P MoE layers split from dense.

"First enlarge, then sparse" (TokenMixer-Large §3.4): train the best dense pSwiGLU, then
split each bank's hidden units F into E experts of width F/E and train sparse from there. Hidden unit j of a
dense bank p reads gate[p, :, j] and up[p, :, j] and writes down[p, j, :], so chunk c = units
[c*F/E, (c+1)*F/E) is a complete sub-pSwiGLU: chunk 0 becomes the shared expert (narrow width F/E), chunks
1..E-1 the routed experts 0..E_r-1 (bank p*E_r + e); with `shared_expert: none` chunk c is routed expert c.
The router keeps its fresh initialization (a dense source has none).

Legend: P positions (banks), W token width, F dense hidden width, E experts, E_r routed experts, Fe = F/E.
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import SparsePertokenMoE


def split_dense(w_in_PW2F: torch.Tensor, w_out_PFW: torch.Tensor, moe: SparsePertokenMoE) -> dict[str, torch.Tensor]:
    """One dense pSwiGLU's (fused gate|up, down) weights -> the MoE's expert and shared weights (keys relative
    to the MoE module)."""
    P, W, F2 = w_in_PW2F.shape
    F, Fe, Er = F2 // 2, moe.expert_hidden, moe.n_routed
    E = F // Fe
    shared_F = moe.shared.hidden if moe.shared is not None else 0
    if (P, W) != (moe.n_pos, moe.width) or E * Fe != F or E - Er != int(shared_F > 0) or shared_F not in (0, Fe):
        raise ValueError(f"a dense pSwiGLU of {P} banks x width {W} x hidden {F} does not split into this S-P MoE "
                         f"({moe.n_pos} positions x width {moe.width}, {Er} routed experts of width {Fe}"
                         f"{f', a shared expert of width {shared_F}' if shared_F else ''})")
    # (P, W, E, Fe) per half: chunk c of the hidden units, gate and up kept fused per expert as the layer stores them
    gate_PWEF = w_in_PW2F[..., :F].reshape(P, W, E, Fe)
    up_PWEF = w_in_PW2F[..., F:].reshape(P, W, E, Fe)
    down_PEFW = w_out_PFW.reshape(P, E, Fe, W)
    w_in_PEW2F = torch.cat([gate_PWEF, up_PWEF], -1).permute(0, 2, 1, 3)   # (P, E, W, 2Fe)
    first = E - Er   # 1 when chunk 0 is the shared expert
    out = {"experts.w_in.weight": w_in_PEW2F[:, first:].reshape(P * Er, W, 2 * Fe).clone(),
           "experts.w_out.weight": down_PEFW[:, first:].reshape(P * Er, Fe, W).clone()}
    if first:
        out["shared.w_in.weight"] = w_in_PEW2F[:, 0].clone()
        out["shared.w_out.weight"] = down_PEFW[:, 0].clone()
    return out


def warm_state(model: nn.Module, source: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the full state_dict `model` starts from, the S-P MoE layers split from dense): `source`'s tensors, each
    S-P MoE whose source is a dense pSwiGLU split into experts, its router as initialized. Raises ValueError
    naming the tensors that do not fit."""
    state, split = dict(source), []
    own = model.state_dict()
    for prefix, mod in model.named_modules():
        if not isinstance(mod, SparsePertokenMoE) or f"{prefix}.w_in.weight" not in state:
            continue
        if f"{prefix}.w_in.bias" in state or f"{prefix}.w_out.bias" in state:
            raise ValueError(f"'{prefix}' in the source has biases: an S-P MoE splits only a bias-free pSwiGLU")
        parts = split_dense(state.pop(f"{prefix}.w_in.weight"), state.pop(f"{prefix}.w_out.weight"), mod)
        state.update({f"{prefix}.{k}": v for k, v in parts.items()})
        split.append(prefix)
        for k, v in own.items():   # the router: a dense source has none
            if k.startswith(f"{prefix}.router."):
                state[k] = v
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        raise ValueError("the source weights do not fit this model: " + "; ".join(
            s for s in (f"missing {_few(missing)}" if missing else "", f"unexpected {_few(extra)}" if extra else "",
                        f"shapes differ: {_few(shapes)}" if shapes else "") if s))
    return state, split


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
