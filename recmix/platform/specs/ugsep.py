"""`ugsep:` options of a TokenMixer-Large or RankMixer model (UG-Sep, spec models.md §5). Pure pydantic.

Present = enabled. The user/candidate partition of the features comes from the feature schema's token
groups (`side: user | candidate`); `user_tokens` says how many of the T tokens are user tokens.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional, Union

from pydantic import Field, model_validator

from .base import StrictModel

# "u:g" splits the T tokens u : g between the user and the candidate side.
UserTokenRatio = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,3}:[1-9][0-9]{0,3}$")]


class ICMode(str, Enum):
    masked_off = "masked_off"   # project exactly the slices the mask deleted (default)
    pre_mask = "pre_mask"       # project the whole pre-mask user-head mixed token
    none = "none"


class ICProj(str, Enum):
    per_head = "per_head"       # one (T_g*S -> M) map per user head, added to one candidate head
    dense = "dense"             # one Linear from all user heads' inputs to all candidate heads
    low_rank = "low_rank"       # concat -> r -> all candidate heads


class GlobalTokenSide(str, Enum):
    candidate = "candidate"     # the global MLP reads every feature and is a candidate token
    user = "user"               # it reads the user features only and is a user token (cached per user)


class UserAggregation(str, Enum):
    dedup = "dedup"             # rows of a batch with identical user features share one user-path computation
    per_row = "per_row"         # every row runs its own user path (reference; same scores)


IC_RANK = 32


class UGSepConfig(StrictModel):
    # A ratio "u:g" ("1:1", "3:1", ...) or a whole number of user tokens; 0 = no user tokens, i.e. the
    # unmasked baseline with UG-Sep's per-side tokenizers. Checked against n_tokens by the model config.
    user_tokens: Union[Annotated[int, Field(ge=0, le=4096)], UserTokenRatio] = "1:1"
    ic_mode: ICMode = ICMode.masked_off
    ic_proj: ICProj = ICProj.per_head
    ic_rank: Optional[Annotated[int, Field(gt=0, le=4096)]] = None   # low_rank only; None = IC_RANK
    global_token_side: GlobalTokenSide = GlobalTokenSide.candidate
    user_aggregation: UserAggregation = UserAggregation.dedup

    @property
    def low_rank(self) -> int:
        """The low_rank projection's inner width."""
        return IC_RANK if self.ic_rank is None else self.ic_rank

    def n_user_tokens(self, n_tokens: int) -> int:
        """T_u for a model of n_tokens tokens; ValueError naming the values when they do not fit."""
        if isinstance(self.user_tokens, int):
            if self.user_tokens >= n_tokens:
                raise ValueError(f"ugsep.user_tokens ({self.user_tokens}) must be below n_tokens ({n_tokens}); "
                                 f"a ratio must be quoted in YAML (\"3:1\"), unquoted 3:1 reads as the number 181")
            return self.user_tokens
        u, g = (int(v) for v in self.user_tokens.split(":"))
        if (n_tokens * u) % (u + g):
            raise ValueError(f"ugsep.user_tokens {self.user_tokens} does not split n_tokens ({n_tokens}) into whole "
                             f"tokens; use n_tokens divisible by {u + g} or a whole number of user tokens")
        return n_tokens * u // (u + g)

    @model_validator(mode="after")
    def _rank(self) -> "UGSepConfig":
        if self.ic_proj is not ICProj.low_rank and self.ic_rank is not None:
            raise ValueError(f"ugsep.ic_rank is used by ic_proj low_rank only (ic_proj is {self.ic_proj.value})")
        return self
