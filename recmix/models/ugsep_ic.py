"""Information Compensation (UG-Sep §5.5): give candidate heads back what the user-head mask removed.

Legend: B rows, T tokens, Tu/Tg user/candidate tokens, H heads, Cu user heads, G = H - Cu candidate
heads, S = D/H slice width, M = T*S mixed width, Z = IC input width per user head.

Modes (`ic_mode`): `masked_off` z_h = the candidate-token slices of user head h (deleted by the mask),
Z = Tg*S; `pre_mask` z_h = the whole pre-mask user-head mixed token, Z = M.
Projections (`ic_proj`): `per_head` one (Z -> M) bank per user head h, added to candidate head
(h mod G); `dense` one Linear(Cu*Z -> G*M); `low_rank` Linear(Cu*Z -> r) then Linear(r -> G*M).
The output is added to the candidate heads' mixed tokens before F1: information flows user -> candidate
only, never into user tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from recmix.platform.specs.model import InitDist
from recmix.platform.specs.ugsep import ICMode, ICProj

from .token_layers import PerTokenLinear


class InformationCompensation(nn.Module):
    def __init__(self, ug, T: int, Tu: int, H: int, Cu: int, D: int):
        super().__init__()
        S = D // H
        self.T, self.Tu, self.H, self.Cu, self.S = T, Tu, H, Cu, S
        self.mode, self.proj_kind = ug.ic_mode, ug.ic_proj
        G, M = H - Cu, T * S
        Z = (T - Tu) * S if self.mode is ICMode.masked_off else M
        self.G, self.M, self.Z = G, M, Z
        if self.proj_kind is ICProj.per_head:
            self.proj = PerTokenLinear(Cu, Z, M)
            self.proj.reset_parameters(InitDist.xavier_uniform, 0.01)
            self.register_buffer("target_C", torch.arange(Cu) % G, persistent=False)
        elif self.proj_kind is ICProj.dense:
            self.proj = nn.Linear(Cu * Z, G * M, bias=False)
            nn.init.xavier_uniform_(self.proj.weight, gain=0.01)
        else:
            self.proj = nn.Sequential(nn.Linear(Cu * Z, ug.low_rank, bias=False), nn.Linear(ug.low_rank, G * M, bias=False))
            nn.init.xavier_uniform_(self.proj[1].weight, gain=0.01)

    def forward(self, mu_BCM: torch.Tensor, ng_BTgD: torch.Tensor) -> torch.Tensor:
        """mu_BCM: pre-mask user-head mixed tokens; ng_BTgD: normed candidate tokens. Returns (B, G, M)."""
        B = mu_BCM.shape[0]
        if self.mode is ICMode.masked_off:
            Tg = self.T - self.Tu
            z_BCZ = ng_BTgD.reshape(B, Tg, self.H, self.S)[:, :, : self.Cu].transpose(1, 2).reshape(B, self.Cu, Tg * self.S)
        else:
            z_BCZ = mu_BCM
        if self.proj_kind is ICProj.per_head:
            out_BCM = self.proj(z_BCZ)
            return out_BCM.new_zeros(B, self.G, self.M).index_add(1, self.target_C, out_BCM)
        return self.proj(z_BCZ.reshape(B, -1)).reshape(B, self.G, self.M)
