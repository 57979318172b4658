"""`model:` configs, discriminated by `arch` (dlrm_mlp | rankmixer | tokenmixer_large). Pure pydantic.

Field names follow the spec's models.md (sections 2-5). Every field is honoured by
`recmix.models.build.build_model`; structural constraints (H | D, RankMixer H == T, whole hidden and expert
widths, UG-Sep's token split) are checked here so a bad spec fails at `recmix validate`, before any tensor
exists. Only a T derived from the feature schema (group_mlp without n_tokens) is checked at build time, by
the same `check_tokens`; model constructors trust the validated config.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .base import StrictModel
from .memory import MemoryConfig
from .ugsep import UGSepConfig

PosInt = Annotated[int, Field(gt=0, le=1_000_000)]


class Tokenizer(str, Enum):
    group_mlp = "group_mlp"              # one MLP per semantic group (+ optional global token)
    chunk_shared = "chunk_shared"        # concat, zero-pad, chunk; one shared Linear(d -> D)
    chunk_per_token = "chunk_per_token"  # same chunks, one Linear per token


class GlobalToken(str, Enum):
    mlp = "mlp"          # MLP over the concat of all groups, prepended (TokenMixer-Large)
    none = "none"


class SeqPooling(str, Enum):
    mean = "mean"
    sum = "sum"


class Norm(str, Enum):
    rmsnorm = "rmsnorm"
    layernorm = "layernorm"


class NormPosition(str, Enum):
    pre = "pre"
    post = "post"


class InitDist(str, Enum):
    xavier_uniform = "xavier_uniform"
    xavier_normal = "xavier_normal"


class ResidualMode(str, Enum):
    A = "A"
    B = "B"
    C = "C"


class AuxMode(str, Enum):
    deep_supervision = "deep_supervision"
    logit_fusion = "logit_fusion"
    off = "off"


class MoECompute(str, Enum):
    grouped = "grouped"            # gather rows per (token, expert), one bmm, index_add back
    dense_masked = "dense_masked"  # every expert on every row, gated (reference)


class SharedExpert(str, Enum):
    narrow = "narrow"  # width nD/E like the routed experts
    full = "full"      # width nD (lswhim)
    none = "none"


class MoEPositions(str, Enum):
    both = "both"      # F1 (mixed space) and F2 (per token)
    mixed = "mixed"
    token = "token"


class BalanceLoss(str, Enum):
    none = "none"
    switch = "switch"


class EmbeddingOptions(StrictModel):
    """Local embedding tables; widths come from the feature schema."""

    init_std: Annotated[float, Field(gt=0, le=1.0)] = 0.01
    seq_pooling: SeqPooling = SeqPooling.mean


class AuxLossConfig(StrictModel):
    mode: AuxMode = AuxMode.deep_supervision
    weight: Annotated[float, Field(ge=0, le=100)] = 0.1
    # 1-indexed blocks whose mean-pooled output feeds an aux tower; empty = [L // 2].
    layers: list[PosInt] = Field(default_factory=list, max_length=64)


class SPMoEConfig(StrictModel):
    """Sparse-Pertoken MoE (TokenMixer-Large §4.5). Present = enabled."""

    n_experts: Annotated[int, Field(ge=2, le=256)] = 8      # E, incl. the shared expert
    n_active: Annotated[int, Field(ge=1, le=256)] = 4       # K, incl. the shared expert
    shared_expert: SharedExpert = SharedExpert.narrow
    alpha: Optional[Annotated[float, Field(gt=0, le=1000)]] = None  # None -> E / K
    positions: MoEPositions = MoEPositions.both
    compute: MoECompute = MoECompute.grouped
    balance_loss: BalanceLoss = BalanceLoss.none
    balance_weight: Annotated[float, Field(ge=0, le=10)] = 0.01

    @property
    def n_routed(self) -> int:
        return self.n_experts - 1 if self.shared_expert is not SharedExpert.none else self.n_experts

    @property
    def n_routed_active(self) -> int:
        return self.n_active - 1 if self.shared_expert is not SharedExpert.none else self.n_active

    @property
    def gate_alpha(self) -> float:
        return self.alpha if self.alpha is not None else self.n_experts / self.n_active

    @model_validator(mode="after")
    def _counts(self) -> "SPMoEConfig":
        if self.n_active > self.n_experts:
            raise ValueError(f"moe.n_active ({self.n_active}) must be <= moe.n_experts ({self.n_experts})")
        if self.n_routed_active < 1:
            raise ValueError(f"moe.n_active ({self.n_active}) leaves no routed expert active "
                             f"(shared_expert={self.shared_expert.value}); use n_active >= 2")
        return self


class RouterKind(str, Enum):
    relu = "relu"


class LambdaRule(str, Enum):
    remoe = "remoe"
    fixed = "fixed"


class DTSICoupling(str, Enum):
    mixed_forward = "mixed_forward"
    distill = "distill"
    l1_only = "l1_only"
    off = "off"        # one router, no DTSI


class ReLUMoEConfig(StrictModel):
    """RankMixer's ReLU-routed per-token MoE with DTSI (spec §3.4). Present = enabled."""

    n_experts: Annotated[int, Field(ge=2, le=256)] = 8
    expert_hidden: Literal["full", "fine"] = "full"   # kD each, or kD / N_e each
    router: RouterKind = RouterKind.relu
    target_active_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    lambda_rule: LambdaRule = LambdaRule.remoe
    lambda_init: Annotated[float, Field(ge=0, le=10)] = 1e-8
    lambda_step: Annotated[float, Field(gt=1, le=10)] = 1.2
    dtsi: DTSICoupling = DTSICoupling.mixed_forward
    beta: Annotated[float, Field(ge=0, le=1)] = 0.5
    max_active_infer: Optional[Annotated[int, Field(ge=1, le=256)]] = None


class _Common(StrictModel):
    embedding: EmbeddingOptions = EmbeddingOptions()
    head_hidden: Optional[PosInt] = None   # task-head MLP width; None -> D // 2
    memory: Optional[MemoryConfig] = None  # present = LMN product-key memory read-out (a user-side derived feature)


class DLRMConfig(_Common):
    arch: Literal["dlrm_mlp"]
    hidden: list[PosInt] = Field(default_factory=lambda: [256, 128], min_length=1, max_length=16)


class _Mixer(_Common):
    n_tokens: Optional[PosInt] = None   # T; group_mlp: derived from the schema (groups + global) when None
    d_model: PosInt = 64
    n_heads: Optional[PosInt] = None    # H; None -> T
    n_layers: Annotated[int, Field(ge=1, le=256)] = 2
    ffn_mult: Annotated[float, Field(gt=0, le=64)] = 4.0
    chunk_dim: Optional[PosInt] = None  # chunk tokenizers: d; None -> ceil(sum dims / T)

    def resolved_heads(self, n_tokens: int) -> int:
        return self.n_heads if self.n_heads is not None else n_tokens

    def hidden(self) -> int:
        """ffn_mult * d_model (validated to be whole)."""
        return int(round(self.ffn_mult * self.d_model))

    def check_tokens(self, n_tokens: int) -> None:
        """Constraints that need T. The validator runs them when n_tokens is set; a model whose T comes
        from the feature schema (group_mlp, n_tokens unset) runs them once its tokenizer has counted T."""
        raise NotImplementedError

    def _check_mixer(self) -> None:
        _whole(self.ffn_mult * self.d_model, f"ffn_mult * d_model = {self.ffn_mult} * {self.d_model}")
        if self.n_heads is not None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.tokenizer is not Tokenizer.group_mlp and self.n_tokens is None:
            raise ValueError(f"tokenizer {self.tokenizer.value} needs n_tokens")
        if self.n_tokens is not None:
            self.check_tokens(self.n_tokens)
        _check_ugsep(self)


class RankMixerConfig(_Mixer):
    arch: Literal["rankmixer"]
    tokenizer: Tokenizer = Tokenizer.chunk_per_token
    n_tokens: Optional[PosInt] = 16
    norm: Norm = Norm.layernorm
    norm_position: NormPosition = NormPosition.post
    ffn_bias: bool = True
    moe: Optional[ReLUMoEConfig] = None
    ugsep: Optional[UGSepConfig] = None   # present = UG-Sep masked mixing

    def check_tokens(self, n_tokens: int) -> None:
        if self.n_heads is not None and self.n_heads != n_tokens:
            raise ValueError(f"RankMixer needs n_heads == n_tokens (residual shapes), got H={self.n_heads}, T={n_tokens}")
        if self.d_model % n_tokens:
            raise ValueError(f"RankMixer mixes with n_heads = n_tokens ({n_tokens}), which must divide d_model ({self.d_model})")

    @model_validator(mode="after")
    def _check(self) -> "RankMixerConfig":
        self._check_mixer()
        if self.moe is not None and self.moe.expert_hidden == "fine" and self.hidden() % self.moe.n_experts:
            raise ValueError(f"fine experts need n_experts ({self.moe.n_experts}) to divide ffn_mult*d_model ({self.hidden()})")
        return self


# [choice] TokenMixer-Large defaults to chunk tokens (T = 16, no global token), not the spec's group_mlp + global
# token: group_mlp's few tokens learned slower on planted synthetic data (docs/models.md, "Measured guidance").
_TML_TOKENS = {Tokenizer.group_mlp: dict(global_token=GlobalToken.mlp),   # n_tokens None: T from the schema
               Tokenizer.chunk_shared: dict(global_token=GlobalToken.none, n_tokens=16),
               Tokenizer.chunk_per_token: dict(global_token=GlobalToken.none, n_tokens=16)}


class TokenMixerLargeConfig(_Mixer):
    arch: Literal["tokenmixer_large"]
    tokenizer: Tokenizer = Tokenizer.chunk_per_token
    # Unset: none and 16 for chunk tokenizers; mlp and T from the schema for group_mlp (`_tokenizer_defaults`).
    global_token: GlobalToken = GlobalToken.none
    n_tokens: Optional[PosInt] = None
    n_layers: Annotated[int, Field(ge=1, le=256)] = 4
    norm: Norm = Norm.rmsnorm
    residual_mode: ResidualMode = ResidualMode.B
    init_dist: InitDist = InitDist.xavier_uniform
    down_init_std_scale: Annotated[float, Field(ge=0, le=10)] = 0.01
    inter_residual_gap: Annotated[int, Field(ge=0, le=256)] = 2
    aux_loss: AuxLossConfig = AuxLossConfig()
    moe: Optional[SPMoEConfig] = None
    ugsep: Optional[UGSepConfig] = None   # present = UG-Sep masked mixing

    def aux_layers(self) -> list[int]:
        if self.aux_loss.mode is AuxMode.off:
            return []
        return list(self.aux_loss.layers) or [max(1, self.n_layers // 2)]

    def mixed_width(self, n_tokens: int) -> int:
        """M = T * D / H, the width of one mixed token (F1's bank width)."""
        return n_tokens * self.d_model // self.resolved_heads(n_tokens)

    def moe_at(self, position: MoEPositions) -> bool:
        """Whether F1 (`mixed`) or F2 (`token`) is an S-P MoE."""
        return self.moe is not None and self.moe.positions in (MoEPositions.both, position)

    def check_tokens(self, n_tokens: int) -> None:
        H = self.resolved_heads(n_tokens)
        if self.d_model % H:
            raise ValueError(f"n_heads defaults to n_tokens ({n_tokens}), which must divide d_model ({self.d_model})")
        M = self.mixed_width(n_tokens)
        _whole(self.ffn_mult * M, f"ffn_mult * mixed-token width T*D/H = {self.ffn_mult} * {M}")
        for pos, width in ((MoEPositions.mixed, M), (MoEPositions.token, self.d_model)):
            hid = int(round(self.ffn_mult * width))
            if self.moe_at(pos) and hid % self.moe.n_experts:
                raise ValueError(f"moe.n_experts ({self.moe.n_experts}) must divide the {pos.value} pSwiGLU hidden width "
                                 f"ffn_mult*{width} ({hid})")

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_defaults(cls, data):
        """Fill the unset `global_token` / `n_tokens` by tokenizer; a value the spec gives (null included) is kept."""
        if not isinstance(data, dict):
            return data
        try:
            tokenizer = Tokenizer(data.get("tokenizer", Tokenizer.chunk_per_token))
        except ValueError:
            return data   # the field validator reports the bad tokenizer
        return {**_TML_TOKENS[tokenizer], **data}

    @model_validator(mode="after")
    def _check(self) -> "TokenMixerLargeConfig":
        self._check_mixer()
        if self.ugsep is None and self.tokenizer is not Tokenizer.group_mlp and self.global_token is not GlobalToken.none:
            raise ValueError(f"global_token {self.global_token.value} is built by the group_mlp tokenizer only "
                             f"(tokenizer is {self.tokenizer.value}); set global_token: none")
        bad = [l for l in self.aux_loss.layers if l >= self.n_layers]
        if bad and self.aux_loss.mode is not AuxMode.off:
            raise ValueError(f"aux_loss.layers {bad} must be below n_layers ({self.n_layers}): the last block feeds the main head")
        if self.aux_layers() and self.n_layers < 2 and self.aux_loss.mode is not AuxMode.off:
            raise ValueError("aux_loss needs n_layers >= 2 (or aux_loss.mode: off)")
        return self


def _whole(x: float, what: str) -> None:
    if abs(x - round(x)) > 1e-6:
        raise ValueError(f"{what} = {x} must be a whole number (a pSwiGLU / FFN hidden width)")


def _check_ugsep(cfg: _Mixer) -> None:
    """UG-Sep chunks each side's features into its own tokens, so T is explicit and split by user_tokens."""
    if cfg.ugsep is None:
        return
    if cfg.n_tokens is None:
        raise ValueError("ugsep needs n_tokens (the user and candidate sides are chunked into T_u and T - T_u tokens)")
    if cfg.tokenizer is not Tokenizer.chunk_per_token:
        raise ValueError(f"ugsep tokenizes each side with chunk_per_token, got tokenizer {cfg.tokenizer.value}")
    if cfg.moe is not None:
        raise ValueError("ugsep with moe is not supported yet: remove one of them")
    Tu = cfg.ugsep.n_user_tokens(cfg.n_tokens)
    H = cfg.resolved_heads(cfg.n_tokens)
    if (H * Tu) % cfg.n_tokens:
        raise ValueError(f"ugsep user heads n_heads*T_u/n_tokens = {H}*{Tu}/{cfg.n_tokens} must be whole")
    if isinstance(cfg, TokenMixerLargeConfig) and cfg.residual_mode is not ResidualMode.B:
        raise ValueError(f"ugsep is implemented for residual_mode B, got {cfg.residual_mode.value}")


ModelConfig = Annotated[Union[DLRMConfig, RankMixerConfig, TokenMixerLargeConfig], Field(discriminator="arch")]


# Paper-size presets (counted, not trained). T, D, L, k of RankMixer are the paper's (k implied by Eq. 12);
# TokenMixer-Large's are undisclosed, chosen so 3n*T*D^2*(T/H+1)*L lands on the reported sizes.
PRESETS: dict[str, dict] = {
    "rankmixer_100m": dict(arch="rankmixer", n_tokens=16, d_model=768, n_layers=2, ffn_mult=2.8125),
    "rankmixer_1b": dict(arch="rankmixer", n_tokens=32, d_model=1536, n_layers=2, ffn_mult=3.5625),
    "tokenmixer_large_500m": dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none",
                                  n_tokens=16, d_model=576, n_layers=4, ffn_mult=4.0),
    "tokenmixer_large_4b": dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none",
                                n_tokens=32, d_model=864, n_layers=8, ffn_mult=4.0),
    "tokenmixer_large_7b": dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none",
                                n_tokens=32, d_model=928, n_layers=12, ffn_mult=4.0),
}


def preset(name: str) -> Union[RankMixerConfig, TokenMixerLargeConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    from pydantic import TypeAdapter

    return TypeAdapter(ModelConfig).validate_python(PRESETS[name])
