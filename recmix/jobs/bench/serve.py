"""`recmix bench serve`: closed-loop HTTP clients against Ranker apps on Ray Serve, on one local cluster.

Two artifacts of the same TokenMixer-Large (toy ml-100k-like schema, same T, d_model, layers), one without
UG-Sep (the baseline) and one with UG-Sep 1:1, are deployed side by side (one replica each, 1 CPU, 1 torch
thread, batching off) and loaded in turn by `clients` threads for `seconds` each: every request carries
`candidates` candidates. Phases: the baseline, UG-Sep with a new user per request (user-cache miss), UG-Sep
with each client repeating its user (cache hit). Weights are random (latency does not depend on training).
Reported per phase: requests, errors, QPS, p50 and p99 latency seen by the client.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time

import numpy as np

from recmix.platform.bench import BenchReport
from recmix.platform.specs.bench import ServeBenchParams

MODEL = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=8, d_model=64,
             n_layers=2, ffn_mult=2.0)


def _artifact(root: str, model: dict) -> str:
    import torch
    from pydantic import TypeAdapter

    from recmix.models import artifact as fmt
    from recmix.models.build import build_model
    from recmix.models.toy import toy_schema
    from recmix.platform.specs.model import ModelConfig

    schema = toy_schema(emb_dim=16)
    torch.manual_seed(0)
    m = build_model(TypeAdapter(ModelConfig).validate_python(model), schema)
    os.makedirs(os.path.join(root, "v1"))
    torch.save(m.state_dict(), os.path.join(root, "v1", fmt.DENSE))
    doc = {"format": fmt.FORMAT, "version": "v1", "model": model, "features": schema.model_dump(mode="json"),
           "dense": fmt.DENSE, "embeddings": None, "metrics": {}}
    with open(os.path.join(root, "v1", fmt.DOC), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(root, fmt.LATEST), "w") as f:
        f.write("v1\n")
    return root


def _value(f, rng: random.Random):
    kind = f.type.value
    hi = f.vocab_size or 10**12
    if kind == "dense":
        return rng.random() if f.dim == 1 else [rng.random() for _ in range(f.dim)]
    if kind == "categorical":
        return rng.randrange(hi)
    return [rng.randrange(hi) for _ in range(rng.randrange(1, int(f.max_len) + 1))]


def request(codec, n_cand: int, rng: random.Random, user_rng: random.Random) -> bytes:
    user = {f.name: _value(f, user_rng) for f in codec.request_features}
    cands = [{f.name: _value(f, rng) for f in codec.candidate_features} for _ in range(n_cand)]
    return json.dumps({"user": user, "candidates": cands}).encode()


def _phase(url: str, codec, p: ServeBenchParams, seconds: float, same_user: bool) -> dict:
    import requests

    stop = threading.Event()
    lat: list[float] = []
    errors = [0]

    def client(i: int) -> None:
        s = requests.Session()
        rng = random.Random(i)
        n = 0
        while not stop.is_set():
            n += 1
            body = request(codec, p.candidates, rng, random.Random(i if same_user else i * 1_000_003 + n))
            t0 = time.perf_counter()
            try:
                ok = s.post(f"{url}/v1/rank", data=body, headers={"content-type": "application/json"},
                            timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t0)
            else:
                errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(p.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1e3 if lat else np.zeros(1)
    return {"requests": len(lat), "errors": errors[0], "qps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


def run(quick: bool, params: ServeBenchParams) -> BenchReport:
    from ray import serve

    from recmix.jobs.serve import deploy
    from recmix.jobs.serve.features import FeatureCodec
    from recmix.models.toy import toy_schema
    from recmix.platform import cluster
    from recmix.platform.cluster import free_port
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.serve import ServeSpec

    seconds = 3.0 if quick else params.seconds
    codec = FeatureCodec(toy_schema(emb_dim=16))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="recmix-bench-serve-") as tmp, \
            cluster.cluster(ClusterConfig(num_cpus=4), include_dashboard=False, echo=lambda s: None):
        port = free_port()
        urls = {}
        for name, model in (("baseline", MODEL), ("ugsep", {**MODEL, "ugsep": {"user_tokens": "1:1"}})):
            spec = ServeSpec.model_validate({
                "kind": "serve", "name": name, "artifact": {"uri": _artifact(os.path.join(tmp, name), model)},
                "replicas": {"cpus": 1, "max_ongoing_requests": 2 * params.clients}, "batching": {"max_batch_size": 1},
                "limits": {"max_candidates": params.candidates, "max_body_bytes": 64 << 20},
                "http": {"port": port, "route_prefix": f"/{name}"}})
            urls[name] = deploy(spec, log=lambda s: None)
        try:
            for phase, url, same in (("baseline", urls["baseline"], False), ("ugsep_miss", urls["ugsep"], False),
                                     ("ugsep_hit", urls["ugsep"], True)):
                _phase(url, codec, params, min(1.0, seconds), same)   # warm-up: first requests, cache filled
                results[phase] = _phase(url, codec, params, seconds, same)
        finally:
            serve.shutdown()
    base = results["baseline"]["p50_ms"]
    rows = [[k, v["requests"], v["errors"], v["qps"], v["p50_ms"], v["p99_ms"], v["p50_ms"] / base]
            for k, v in results.items()]
    results["ugsep_miss_p50_vs_baseline"] = results["ugsep_miss"]["p50_ms"] / base
    results["ugsep_hit_p50_vs_miss"] = results["ugsep_hit"]["p50_ms"] / results["ugsep_miss"]["p50_ms"]
    return BenchReport(title=f"serve: Ranker over HTTP, {params.candidates} candidates/request, {params.clients} "
                             f"closed-loop clients, {seconds:g} s per phase",
                       columns=["phase", "requests", "errors", "QPS", "p50 ms", "p99 ms", "p50 vs baseline"],
                       rows=rows, results=results,
                       config={"model": MODEL, "candidates": params.candidates, "clients": params.clients,
                               "seconds": seconds},
                       notes=["one replica per app (1 CPU, 1 torch thread), batching off; clients share the host's cores"])
