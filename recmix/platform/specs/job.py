"""`JobSpec`: every job kind, discriminated by `kind`. Each kind composes component configs."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, model_validator

from .base import StrictModel
from .bench import BenchSpec
from .cluster import ClusterConfig
from .data import Name
from .prepare import PrepareSpec
from .serve import ServeSpec
from .train import TrainSpec


StageSpec = Annotated[Union[PrepareSpec, BenchSpec, TrainSpec, ServeSpec], Field(discriminator="kind")]


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


JobSpec = Annotated[Union[PrepareSpec, BenchSpec, PipelineSpec, TrainSpec, ServeSpec], Field(discriminator="kind")]
JOB_ADAPTER: TypeAdapter = TypeAdapter(JobSpec)
KINDS = {"prepare": PrepareSpec, "bench": BenchSpec, "pipeline": PipelineSpec, "train": TrainSpec, "serve": ServeSpec}
