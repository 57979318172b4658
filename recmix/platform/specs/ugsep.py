"""`ugsep:` options of a TokenMixer-Large model (UG-Sep, spec models.md §5). Pure pydantic.

Present = enabled. The user/candidate partition of the features comes from the feature schema's token
groups (`side: user | candidate`); this config says how many of the T tokens are user tokens.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

from pydantic import Field, model_validator

from .base import StrictModel


class UGRatio(str, Enum):
    r1_2 = "1:2"
    r1_1 = "1:1"
    r2_1 = "2:1"
    r3_1 = "3:1"
    r5_1 = "5:1"


class ICMode(str, Enum):
    masked_off = "masked_off"   # project exactly the slices the mask deleted (default)
    pre_mask = "pre_mask"       # project the whole pre-mask user-head mixed token
    none = "none"


class ICProj(str, Enum):
    per_head = "per_head"       # one (T_g*S -> M) map per user head, added to one candidate head
    dense = "dense"             # one Linear from all user heads' inputs to all candidate heads
    low_rank = "low_rank"       # concat -> r -> all candidate heads


class Side(str, Enum):
    g = "g"
    u = "u"


class Toggle(str, Enum):
    on = "on"
    off = "off"


class UGSepConfig(StrictModel):
    ratio: UGRatio = UGRatio.r1_1
    # Explicit T_u; overrides `ratio`. 0 gives the unmasked baseline (every token candidate-side).
    n_user_tokens: Optional[Annotated[int, Field(ge=0, le=4096)]] = None
    ic_mode: ICMode = ICMode.masked_off
    ic_proj: ICProj = ICProj.per_head
    ic_rank: Annotated[int, Field(gt=0, le=4096)] = 32
    global_token_side: Side = Side.g
    # Rows of a batch with identical user-side features share one user-path computation.
    train_user_aggregation: Toggle = Toggle.on

    def user_tokens(self, n_tokens: int) -> int:
        if self.n_user_tokens is not None:
            if self.n_user_tokens >= n_tokens:
                raise ValueError(f"ugsep.n_user_tokens ({self.n_user_tokens}) must be below n_tokens ({n_tokens})")
            return self.n_user_tokens
        u, g = (int(v) for v in self.ratio.value.split(":"))
        if (n_tokens * u) % (u + g):
            raise ValueError(f"ugsep.ratio {self.ratio.value} does not split n_tokens ({n_tokens}) into whole tokens; "
                             f"use n_tokens divisible by {u + g} or set ugsep.n_user_tokens")
        return n_tokens * u // (u + g)

    @model_validator(mode="after")
    def _rank(self) -> "UGSepConfig":
        if self.ic_proj is not ICProj.low_rank and "ic_rank" in self.model_fields_set:
            raise ValueError(f"ugsep.ic_rank is used by ic_proj low_rank only (ic_proj is {self.ic_proj.value})")
        return self
