"""The Ray Serve application: a `Ranker` deployment with a FastAPI ingress (docs/serving.md).

HTTP: POST /v1/rank, GET /v1/health, GET /v1/model; the OpenAPI document at /openapi.json (docs at /docs).
Python callers: `handle.rank.remote(RankRequest | dict)` on the app's DeploymentHandle, the same checks.
Request bodies are read and parsed here rather than by FastAPI so that every bad input maps to one status:
over `limits.max_body_bytes` 413, not JSON 400, schema or feature errors 422; a 5xx is a bug.

`build_app(args)` is the Serve config's import path target (`recmix serve-config`): args = {"spec": ...}.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations from the class Serve serialized
# by value, whose globals hold only the names its code uses (a string "Request" would not resolve).

import asyncio
import json
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from recmix.platform.specs.serve import ServeSpec

from .config import deployment_options
from .features import FeatureCodec, RankRequest, RequestError
from .scorer import Scorer, UserCache, ranking

api = FastAPI(title="recmix ranker", version="1",
              description="Ranks candidates for one user with a trained recmix model artifact.")

_RANK_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": RankRequest.model_json_schema(
    ref_template="#/components/schemas/{model}")}}}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}" + (f" ({e.error_count() - 1} more)" if e.error_count() > 1 else "")


# Above the deployment: Serve serializes the class (and the globals it names) when its decorator runs.
def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _schema(doc: dict):
    from recmix.platform.specs.data import FeatureSchema

    return FeatureSchema.model_validate(doc["features"])


class Metrics:
    """`ray.util.metrics`, tag component="serve" (exported as ray_recmix_serve_*)."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = ("component", "status")
        self.requests = Counter("recmix_serve_requests", description="rank requests by HTTP status", tag_keys=tags)
        self.cache = Counter("recmix_serve_user_cache", description="user-state cache lookups (result: hit, miss)",
                             tag_keys=("component", "result"))
        self.unknown = Counter("recmix_serve_unknown_ids", description="ids outside the training vocabulary",
                               tag_keys=("component",))
        self.candidates = Counter("recmix_serve_candidates", description="candidates scored", tag_keys=("component",))
        self.latency = Histogram("recmix_serve_latency_s", description="rank request latency inside the replica",
                                 boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
                                 tag_keys=("component",))
        # 1 for the version this replica serves; set again on every request because Ray's metrics agent drops
        # a gauge not set for ~20 s (docs/log.md), so an idle replica's series may lapse until its next request
        self.model = Gauge("recmix_serve_model", description="the model version a replica serves (value 1)",
                           tag_keys=("component", "version"))
        for m in (self.requests, self.cache, self.unknown, self.candidates, self.latency, self.model):
            m.set_default_tags({"component": "serve"})


@serve.deployment(name="Ranker")
@serve.ingress(api)
class Ranker:
    def __init__(self, spec: dict):
        import torch

        from recmix.models.artifact import load_artifact, resolve_version
        from recmix.platform import storage

        self.spec = ServeSpec.model_validate(spec)
        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        uri = self.spec.artifact.uri
        if self.spec.artifact.version != "LATEST":
            uri = storage.join(uri.rstrip("/"), self.spec.artifact.version)
        self.uri = resolve_version(uri, self.spec.storage)
        # A replica with a GPU (replicas.gpus > 0; Ray sets CUDA_VISIBLE_DEVICES) scores on it.
        device = "cuda" if self.spec.replicas.gpus > 0 and torch.cuda.is_available() else "cpu"
        emb = self.spec.embeddings
        if emb.mode.value == "shard_group":
            from .shards import load_with_shard_group

            model = load_with_shard_group(self.uri, self.spec.storage, emb.shards, emb.hot_rows, emb.cpus, device)
        else:
            model = load_artifact(self.uri, self.spec.storage, device=device)
        doc = model.artifact
        if self.spec.quant.value == "w8a16":
            from recmix.models.quantize import quantize_model

            model = quantize_model(model, config=self.spec.w8a16)
        self.doc = doc
        self.codec = FeatureCodec(_schema(doc))
        self.scorer = Scorer(model, doc["version"], UserCache(self.spec.cache.size, self.spec.cache.ttl_s))
        self.metrics = Metrics()
        self.metrics.model.set(1.0, tags={"version": self.scorer.version})
        b = self.spec.batching
        self.batched.set_max_batch_size(b.max_batch_size)
        self.batched.set_batch_wait_timeout_s(b.wait_s)

    # --- HTTP ---------------------------------------------------------------------------------------------

    @api.post("/v1/rank", openapi_extra=_RANK_BODY)
    async def http_rank(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        resp = await self._http_rank(request)
        self.metrics.requests.inc(1.0, tags={"status": str(resp.status_code)})
        self.metrics.latency.observe(time.perf_counter() - t0)
        self.metrics.model.set(1.0, tags={"version": self.scorer.version})
        return resp

    async def _http_rank(self, request: Request) -> JSONResponse:
        limit = self.spec.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return _error(400, f"Content-Length {declared[:40]!r} is not a byte count")
        if declared is not None and int(declared) > limit:
            return _error(413, f"request body over the limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, f"request body over the limit of {limit} bytes")
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            return _error(400, f"malformed JSON: {str(e).splitlines()[0][:200]}")
        try:
            return JSONResponse(await self.rank(data))
        except ValidationError as e:
            return _error(422, _validation_message(e))
        except RequestError as e:
            return _error(422, str(e))

    @api.get("/v1/health")
    async def health(self) -> dict:
        return {"status": "ok", "model_version": self.scorer.version, "pid": os.getpid()}

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        return {"version": self.scorer.version, "uri": self.uri, "arch": self.doc["model"].get("arch"),
                "ugsep": self.scorer.ugsep, "quant": self.spec.quant.value, "metrics": self.doc.get("metrics"),
                "embeddings": self._embeddings(),
                "features": self.codec.describe(), "limits": self.spec.limits.model_dump(),
                "created_utc": self.doc.get("created_utc")}

    def _embeddings(self) -> dict:
        lookup = self.scorer.model.encoder.lookup
        out = {"mode": self.spec.embeddings.mode.value}
        if hasattr(lookup, "hits"):    # a shard group: the replica's hot cache
            out["hot_cache"] = {"hits": lookup.hits, "misses": lookup.misses}
        return out

    # --- Python callers (DeploymentHandle) and the HTTP route ----------------------------------------------

    async def rank(self, data: Any) -> dict:
        """RankRequest (or its dict) -> the response body; ValidationError / RequestError for bad input."""
        t0 = time.perf_counter()
        req = data if isinstance(data, RankRequest) else RankRequest.model_validate(data)
        if len(req.candidates) > self.spec.limits.max_candidates:
            raise RequestError(f"candidates: {len(req.candidates)} candidates, more than the limit "
                               f"{self.spec.limits.max_candidates}")
        enc = self.codec.encode(req)
        t1 = time.perf_counter()
        res = await self.batched(enc)
        if res.cache_hit is not None:
            self.metrics.cache.inc(1.0, tags={"result": "hit" if res.cache_hit else "miss"})
        if enc.unknown_ids:
            self.metrics.unknown.inc(float(enc.unknown_ids))
        self.metrics.candidates.inc(float(enc.n_candidates))
        return {"request_id": req.request_id, "model_version": self.scorer.version, "scores": res.scores,
                "ranking": ranking(res.scores, req.top_k),
                "timing_ms": {"encode": (t1 - t0) * 1e3, "user": res.user_ms, "candidates": res.candidates_ms,
                              "total": (time.perf_counter() - t0) * 1e3},
                "cache_hit": res.cache_hit, "batch_requests": res.batch_requests, "unknown_ids": enc.unknown_ids}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=1)
    async def batched(self, encs: list) -> list:
        # Scored in a worker thread (torch and ray.get release the GIL), so the event loop keeps reading,
        # parsing and encoding the next requests, and answering health checks, meanwhile. Serve runs one batch
        # at a time (max_concurrent_batches=1): the scorer and its user cache never see two threads at once.
        return await asyncio.to_thread(self.scorer.score_many, encs)


def application(spec: ServeSpec):
    return Ranker.options(**deployment_options(spec)).bind(spec.model_dump(mode="json"))


def build_app(args: dict):
    """Serve config entry point: args {"spec": <a serve spec as a dict>}."""
    return application(ServeSpec.model_validate(args["spec"]))
