"""`recmix bench serve`: closed-loop HTTP clients against Ranker apps on Ray Serve, on one local cluster.

Shapes are those of `recmix bench ugsep --quick`: the ml-100k feature schema (50-item history with aligned
ratings and gaps on the user side), TokenMixer-Large T=16, d_model 64, 2 layers, FFN x4, random weights (latency
does not depend on training). Apps, one replica each (1 CPU, 1 torch thread, batching off):
  baseline   the same model without user tokens (ugsep.user_tokens 0): every candidate row runs every bank
  ugsep      UG-Sep 1:1, user cache off: every request runs `encode_user` once, then `score`
  ugsep_hit  UG-Sep 1:1, user cache on, each client repeating its user: `score` only
Request bodies are generated before any phase, so clients only send bytes; the baseline and the UG-Sep
(miss) phases send the very same bodies. Phases run in interleaved rounds (baseline, miss, hit, repeated)
so drift of the machine's load hits all of them alike. Reported per phase: requests, errors, QPS, p50 and p99
latency seen by the client, the p50 of the replica's own time (`timing_ms.total`: from the parsed body to the
response, including the wait for the scorer while another request's batch runs; the rest of the client's
latency is HTTP, Serve's proxy and the client), and the p50 of its compute (`encode` + `user` + `candidates`).
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

MODEL = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=16, d_model=64,
             n_layers=2, ffn_mult=4.0, aux_loss={"mode": "off"})
SCHEMA = dict(n_users=943, n_items=1682, history_len=50)   # ml-100k's sizes
APPS = {"baseline": ({"user_tokens": 0}, 0), "ugsep": ({"user_tokens": "1:1"}, 0),
        "ugsep_hit": ({"user_tokens": "1:1"}, 10_000)}     # name -> (ugsep, cache size)
PHASES = (("baseline", "baseline", False), ("ugsep_miss", "ugsep", False), ("ugsep_hit", "ugsep_hit", True))
POOL = 64   # distinct bodies per client


def schema():
    from recmix.jobs.prepare.builtin import builtin_schema

    return builtin_schema(**SCHEMA)


def _artifact(root: str, model: dict) -> str:
    import torch
    from pydantic import TypeAdapter

    from recmix.models import artifact as fmt
    from recmix.models.build import build_model
    from recmix.platform.specs.model import ModelConfig

    s = schema()
    torch.manual_seed(0)
    m = build_model(TypeAdapter(ModelConfig).validate_python(model), s)
    os.makedirs(os.path.join(root, "v1"))
    torch.save(m.state_dict(), os.path.join(root, "v1", fmt.DENSE))
    doc = {"format": fmt.FORMAT, "version": "v1", "model": model, "features": s.model_dump(mode="json"),
           "dense": fmt.DENSE, "embeddings": None, "metrics": {}}
    with open(os.path.join(root, "v1", fmt.DOC), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(root, fmt.LATEST), "w") as f:
        f.write("v1\n")
    return root


def _value(f, rng: random.Random, length: int):
    kind = f.type.value
    hi = f.vocab_size or 10**12
    if kind == "dense":
        return rng.random() if f.dim == 1 else [rng.random() for _ in range(f.dim)]
    if kind == "categorical":
        return rng.randrange(hi)
    n = min(length, int(f.max_len)) if kind == "sequence" else rng.randrange(1, int(f.max_len) + 1)
    return [rng.randrange(hi) for _ in range(n)]


def request(codec, n_cand: int, rng: random.Random, user_rng: random.Random) -> bytes:
    """A user with a history of random length (its sequences aligned: one value per position each)."""
    length = user_rng.randrange(1, 1 + max((int(f.max_len) for f in codec.request_features if f.max_len), default=1))
    user = {f.name: _value(f, user_rng, length) for f in codec.request_features}
    cands = [{f.name: _value(f, rng, 0) for f in codec.candidate_features} for _ in range(n_cand)]
    return json.dumps({"user": user, "candidates": cands}).encode()


def bodies(codec, p: ServeBenchParams, same_user: bool) -> list[list[bytes]]:
    """Per client, POOL bodies: a new user in each (cache misses), or the client's own user in all (hits)."""
    return [[request(codec, p.candidates, random.Random(i * POOL + n),
                     random.Random(i if same_user else 1_000_003 * (i + 1) + n)) for n in range(POOL)]
            for i in range(p.clients)]


def _phase(url: str, pools: list[list[bytes]], seconds: float) -> dict:
    """Closed loop: each client posts its bodies in turn for `seconds`; latencies in ms."""
    import requests

    stop = threading.Event()
    lat: list[float] = []
    replica: list[float] = []
    compute: list[float] = []
    errors: list[str] = []

    def client(pool: list[bytes]) -> None:
        s = requests.Session()
        n = 0
        while not stop.is_set():
            body = pool[n % len(pool)]
            n += 1
            t0 = time.perf_counter()
            try:
                r = s.post(f"{url}/v1/rank", data=body, headers={"content-type": "application/json"}, timeout=60)
            except requests.RequestException as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            lat.append((time.perf_counter() - t0) * 1e3)
            t = r.json()["timing_ms"]
            replica.append(t["total"])
            compute.append(t["encode"] + t["user"] + t["candidates"])

    threads = [threading.Thread(target=client, args=(pool,), daemon=True) for pool in pools]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return {"lat_ms": lat, "replica_ms": replica, "compute_ms": compute, "errors": errors, "wall_s": time.perf_counter() - t0}


def _summary(runs: list[dict]) -> dict:
    lat = np.array([x for r in runs for x in r["lat_ms"]] or [np.nan])
    rep = np.array([x for r in runs for x in r["replica_ms"]] or [np.nan])
    comp = np.array([x for r in runs for x in r["compute_ms"]] or [np.nan])
    n = sum(len(r["lat_ms"]) for r in runs)
    errors = [e for r in runs for e in r["errors"]]
    return {"requests": n, "errors": len(errors), "first_error": errors[0] if errors else None,
            "qps": n / sum(r["wall_s"] for r in runs),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "replica_p50_ms": float(np.percentile(rep, 50)), "compute_p50_ms": float(np.percentile(comp, 50))}


def run(quick: bool, params: ServeBenchParams) -> BenchReport:
    from ray import serve

    from recmix.jobs.serve import deploy
    from recmix.jobs.serve.features import FeatureCodec
    from recmix.platform import cluster
    from recmix.platform.cluster import free_port
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.serve import ServeSpec

    rounds = 1 if quick else 3
    seconds = 3.0 if quick else params.seconds
    codec = FeatureCodec(schema())
    pools = {False: bodies(codec, params, same_user=False), True: bodies(codec, params, same_user=True)}
    runs: dict[str, list[dict]] = {phase: [] for phase, _, _ in PHASES}
    with tempfile.TemporaryDirectory(prefix="recmix-bench-serve-") as tmp, \
            cluster.cluster(ClusterConfig(num_cpus=len(APPS) + 1), include_dashboard=False, echo=lambda s: None):
        port = free_port()
        urls = {}
        for name, (ugsep, cache) in APPS.items():
            root = _artifact(os.path.join(tmp, name), {**MODEL, "ugsep": ugsep})
            spec = ServeSpec.model_validate({
                "kind": "serve", "name": name, "artifact": {"uri": root},
                "replicas": {"cpus": 1, "max_ongoing_requests": 2 * params.clients}, "batching": {"max_batch_size": 1},
                "cache": {"size": cache}, "limits": {"max_candidates": params.candidates, "max_body_bytes": 64 << 20},
                "http": {"port": port, "route_prefix": f"/{name}"}})
            urls[name] = deploy(spec, log=lambda s: None)
        try:
            for phase, app, same in PHASES:   # warm-up: first requests, the hit app's cache filled
                _phase(urls[app], pools[same], min(1.0, seconds))
            for _ in range(rounds):
                for phase, app, same in PHASES:
                    runs[phase].append(_phase(urls[app], pools[same], seconds / rounds))
        finally:
            serve.shutdown()
    results: dict = {phase: _summary(r) for phase, r in runs.items()}
    base = results["baseline"]["p50_ms"]
    rows = [[k, v["requests"], v["errors"], v["qps"], v["p50_ms"], v["p99_ms"], v["replica_p50_ms"], v["compute_p50_ms"],
             v["p50_ms"] / base]
            for k, v in results.items()]
    results["ugsep_miss_p50_vs_baseline"] = results["ugsep_miss"]["p50_ms"] / base
    results["ugsep_hit_p50_vs_baseline"] = results["ugsep_hit"]["p50_ms"] / base
    results["ugsep_hit_p50_vs_miss"] = results["ugsep_hit"]["p50_ms"] / results["ugsep_miss"]["p50_ms"]
    return BenchReport(title=f"serve: Ranker over HTTP, {params.candidates} candidates/request, {params.clients} "
                             f"closed-loop clients, {seconds:g} s per phase in {rounds} interleaved round(s)",
                       columns=["phase", "requests", "errors", "QPS", "p50 ms", "p99 ms", "replica p50 ms",
                                "compute p50 ms", "p50 vs baseline"],
                       rows=rows, results=results,
                       config={"model": MODEL, "schema": SCHEMA, "candidates": params.candidates,
                               "clients": params.clients, "seconds": seconds, "rounds": rounds},
                       notes=["one replica per app (1 CPU, 1 torch thread), batching off; clients share the host's "
                              "cores; baseline = the same model without user tokens, same request bodies as ugsep_miss"])
