"""`build_derived(cfg, schema)`: every derived feature a model config asks for (recmix.models.derived), from
the components that provide them. A module of its own so that the components can subclass
`DerivedFeature` without an import cycle."""

from __future__ import annotations

from .derived import DerivedFeature, check_derived
from .lmn import build_memory
from .sequence import build_sequence_tokens


def build_derived(cfg, schema) -> list[DerivedFeature]:
    """The sequence tokens (feature schema options), then the LMN read-out (`model.memory`), checked."""
    out: list[DerivedFeature] = []
    for builder in _builders():
        out += builder(cfg, schema)
    check_derived(out, schema)
    return out


def _builders():
    return [build_sequence_tokens, build_memory]
