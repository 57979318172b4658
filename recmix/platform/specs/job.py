"""`JobSpec`: every job kind, discriminated by `kind`. Each kind composes component configs."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, field_validator, model_validator

from .base import StrictModel
from .cluster import ClusterConfig
from .data import Name
from .prepare import PrepareSpec
from .train import TrainSpec


class BenchSpec(StrictModel):
    """`kind: bench`: run a registered benchmark (the same as `recmix bench NAME`)."""

    kind: Literal["bench"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    quick: bool = False
    out: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from recmix.platform.bench import registered

        names = registered()
        if v not in names:
            raise ValueError(f"unknown benchmark '{v}' (known: {', '.join(sorted(names))})")
        return v


StageSpec = Annotated[Union[PrepareSpec, BenchSpec, TrainSpec], Field(discriminator="kind")]


class Stage(StrictModel):
    name: Name
    spec: StageSpec


class PipelineSpec(StrictModel):
    """`kind: pipeline`: named stages run in order on one cluster; the first failure stops it."""

    kind: Literal["pipeline"]
    stages: list[Stage] = Field(min_length=1)
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _unique(self) -> "PipelineSpec":
        seen: set[str] = set()
        for s in self.stages:
            if s.name in seen:
                raise ValueError(f"duplicate stage name '{s.name}'")
            seen.add(s.name)
        return self


JobSpec = Annotated[Union[PrepareSpec, BenchSpec, PipelineSpec, TrainSpec], Field(discriminator="kind")]
JOB_ADAPTER: TypeAdapter = TypeAdapter(JobSpec)
KINDS = {"prepare": PrepareSpec, "bench": BenchSpec, "pipeline": PipelineSpec, "train": TrainSpec}
