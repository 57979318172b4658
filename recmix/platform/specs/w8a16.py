"""W8A16 post-training quantization options (spec §5.8): scale granularity, targets and kernel backend."""

from __future__ import annotations

import enum

from pydantic import field_validator

from .base import StrictModel


class Granularity(str, enum.Enum):
    per_channel = "per_channel"  # one fp16 scale per output channel of a bank
    per_group = "per_group"  # one fp16 scale per 128 input rows of a channel


class KernelBackend(str, enum.Enum):
    """Which W8A16 matmul runs. `auto` follows the tensor: Triton on CUDA (when installed), else the CPU path."""

    auto = "auto"
    triton = "triton"
    cpu = "cpu"
    reference = "reference"  # dequantize then fp32 bmm: the readable numerical ground truth


class Target(str, enum.Enum):
    per_token_ffn = "per_token_ffn"
    tokenizer = "tokenizer"
    heads = "heads"


class W8A16Config(StrictModel):
    """`serve_quant=w8a16` options; `backend` is fixed on the quantized layers when they are built."""

    granularity: Granularity = Granularity.per_channel
    targets: list[Target] = [Target.per_token_ffn]
    backend: KernelBackend = KernelBackend.auto

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[Target]) -> list[Target]:
        if Target.per_token_ffn not in v:
            raise ValueError(f"w8a16.targets must include per_token_ffn (options add tokenizer / heads to it), got {[t.value for t in v]}")
        if len(set(v)) != len(v):
            raise ValueError(f"w8a16.targets has duplicates: {[t.value for t in v]}")
        return v
