"""`kind: serve`: a trained model artifact deployed as a ranking service on Ray Serve (docs/serving.md).

Serve's own config models accept misspelled keys silently (an unknown `max_replica` leaves `max_replicas` at
its default); every section here forbids unknown keys, so a typo is an error naming the key.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import StrictModel
from .cluster import ClusterConfig
from .data import Name, StorageConfig, Uri, check_uri
from .w8a16 import W8A16Config


class ArtifactRef(StrictModel):
    """`uri`: an artifact root (`<train output>/artifact`); `version`: one of its version folders or LATEST."""

    uri: Uri
    version: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")] = "LATEST"

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class ReplicaConfig(StrictModel):
    """Serve autoscaling (min == max: a fixed replica count). `look_back_period_s` must exceed Serve's 10 s
    metrics interval (else every replica warns)."""

    min: Annotated[int, Field(ge=1, le=1024)] = 1
    max: Annotated[int, Field(ge=1, le=1024)] = 1
    target_ongoing_requests: Annotated[float, Field(gt=0, le=10_000)] = 2.0
    upscale_delay_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    downscale_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 600.0
    look_back_period_s: Annotated[float, Field(gt=10, le=3600)] = 30.0
    max_ongoing_requests: Annotated[int, Field(ge=1, le=100_000)] = 16
    cpus: Annotated[float, Field(gt=0, le=1024)] = 1.0
    gpus: Annotated[float, Field(ge=0, le=64)] = 0.0

    @model_validator(mode="after")
    def _range(self) -> "ReplicaConfig":
        if self.min > self.max:
            raise ValueError(f"replicas.min {self.min} is larger than replicas.max {self.max}")
        return self


class BatchingConfig(StrictModel):
    """Cross-request batching (`@serve.batch`); `max_batch_size` 1 turns it off."""

    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    wait_s: Annotated[float, Field(ge=0, le=10)] = 0.005


class Quant(str, Enum):
    off = "off"
    w8a16 = "w8a16"


class CacheConfig(StrictModel):
    """Per-replica user-state cache (UG-Sep models); `size` 0 turns it off."""

    size: Annotated[int, Field(ge=0, le=10_000_000)] = 10_000
    ttl_s: Annotated[float, Field(gt=0, le=86_400 * 7)] = 300.0


class EmbeddingMode(str, Enum):
    replica = "replica"          # the artifact's tables (or its parameter-server snapshot) inside each replica
    shard_group = "shard_group"  # the snapshot in read-only ServingShard actors, a hot cache in the replica


class EmbeddingServing(StrictModel):
    """Where a replica's embedding rows live. `shard_group` needs an artifact with an embedding snapshot (a
    parameter-server run's): `shards` actors of `cpus` each, `hot_rows` cache slots per table in the replica."""

    mode: EmbeddingMode = EmbeddingMode.replica
    shards: Annotated[int, Field(ge=1, le=1024)] = 2
    hot_rows: Annotated[int, Field(ge=0, le=100_000_000)] = 100_000
    cpus: Annotated[float, Field(ge=0, le=64)] = 0.0


class LimitsConfig(StrictModel):
    max_candidates: Annotated[int, Field(ge=1, le=100_000)] = 1024
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 4 << 20


class HttpConfig(StrictModel):
    """Serve's proxy binds `host` (loopback unless set: the API has no authentication)."""

    host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    route_prefix: Annotated[str, Field(pattern=r"^/[A-Za-z0-9_\-/]*$", max_length=128)] = "/"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9.\-:]+$", v):
            raise ValueError(f"http.host must be a host name or IP address, got '{v}'")
        return v


class SampleConfig(StrictModel):
    """Sample requests sent once the application is up (a pipeline's check that serving works): rows of a
    prepared dataset's split, each request one row's user with the items of `candidates` consecutive rows,
    from `clients` closed-loop clients over HTTP. Reported: p50/p99 latency and the largest difference between
    served scores and `load_artifact`'s offline scores of the same rows."""

    dataset: Uri
    split: Literal["train", "valid", "test"] = "test"
    requests: Annotated[int, Field(ge=1, le=100_000)] = 200
    candidates: Annotated[int, Field(ge=1, le=100_000)] = 50
    clients: Annotated[int, Field(ge=1, le=64)] = 2

    @field_validator("dataset")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class Lifetime(str, Enum):
    serve = "serve"   # keep serving: until Ctrl-C on the embedded cluster; left deployed on a joined cluster
    stop = "stop"     # remove the application once the sample requests are done


class ServeSpec(StrictModel):
    kind: Literal["serve"]
    name: Name = "ranker"                     # the Serve application's name
    artifact: ArtifactRef
    storage: StorageConfig = StorageConfig()
    replicas: ReplicaConfig = ReplicaConfig()
    batching: BatchingConfig = BatchingConfig()
    quant: Quant = Quant.off
    w8a16: W8A16Config = W8A16Config()        # options when quant is w8a16
    cache: CacheConfig = CacheConfig()
    embeddings: EmbeddingServing = EmbeddingServing()
    limits: LimitsConfig = LimitsConfig()
    http: HttpConfig = HttpConfig()
    # torch intra-op threads per replica; None keeps torch's default.
    threads: Optional[Annotated[int, Field(gt=0, le=1024)]] = 1
    sample: Optional[SampleConfig] = None
    lifetime: Lifetime = Lifetime.serve
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _batch_fits(self) -> "ServeSpec":
        # A replica never holds more than max_ongoing_requests requests, so a larger batch never fills.
        if self.batching.max_batch_size > self.replicas.max_ongoing_requests:
            raise ValueError(f"batching.max_batch_size {self.batching.max_batch_size} exceeds "
                             f"replicas.max_ongoing_requests {self.replicas.max_ongoing_requests}")
        if self.sample is not None and self.sample.candidates > self.limits.max_candidates:
            raise ValueError(f"sample.candidates {self.sample.candidates} exceeds limits.max_candidates "
                             f"{self.limits.max_candidates}")
        if self.lifetime is Lifetime.stop and self.sample is None:
            raise ValueError("lifetime 'stop' removes the application after the sample requests: add a sample section")
        return self
