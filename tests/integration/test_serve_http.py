"""Ray Serve end to end over real HTTP on 127.0.0.1: one Ranker app shared by the module's tests.

Served scores equal load_artifact's offline scores; a user-cache hit equals the miss; >= 200 malformed
requests get only 4xx and the replica keeps serving; the DeploymentHandle path; OpenAPI, health, model."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import requests

from recmix.models.artifact import load_artifact
from recmix.platform.cluster import free_port
from recmix.platform.specs.serve import ServeSpec
from tests.serve_fixture import offline_scores, request_rows, write_artifact

pytestmark = pytest.mark.slow
APP = "ranker_test"


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from recmix.jobs.serve import deploy

    root = write_artifact(str(tmp_path_factory.mktemp("artifact")))
    port = free_port()
    spec = ServeSpec.model_validate({"kind": "serve", "name": APP, "artifact": {"uri": root},
                                     "replicas": {"cpus": 0.25, "max_ongoing_requests": 8},
                                     "batching": {"max_batch_size": 4, "wait_s": 0.002},
                                     "limits": {"max_candidates": 64, "max_body_bytes": 65536},
                                     "http": {"port": port}})
    url = deploy(spec, log=lambda s: None)
    yield url, load_artifact(root), spec
    serve.delete(APP)
    serve.shutdown()


def post(url, body, **kw):
    return requests.post(f"{url}/v1/rank", data=body if isinstance(body, (bytes, str)) else json.dumps(body),
                         headers={"content-type": "application/json"}, timeout=30, **kw)


def test_scores_equal_offline_and_cache(served):
    url, model, _ = served
    body = request_rows(32, seed=1, user=7)
    r1 = post(url, body)
    assert r1.status_code == 200, r1.text
    out = r1.json()
    assert out["model_version"] == "v1" and out["request_id"] == "r1" and out["cache_hit"] is False
    offline = offline_scores(model, body)
    assert max(abs(a - b) for a, b in zip(out["scores"], offline)) < 1e-5
    assert out["ranking"] == sorted(range(32), key=lambda i: (-out["scores"][i], i))
    assert set(out["timing_ms"]) == {"encode", "user", "candidates", "total"}
    hit = post(url, {**body, "top_k": 5}).json()
    assert hit["cache_hit"] is True and hit["scores"] == out["scores"] and hit["ranking"] == out["ranking"][:5]
    body["user"]["hist_items"] = [2, 4]
    changed = post(url, body).json()
    assert changed["cache_hit"] is False
    assert max(abs(a - b) for a, b in zip(changed["scores"], offline_scores(model, body))) < 1e-5


def test_health_model_openapi_and_handle(served):
    from ray import serve

    url, model, _ = served
    health = requests.get(f"{url}/v1/health", timeout=10).json()
    assert health["status"] == "ok" and health["model_version"] == "v1" and health["pid"] > 0
    info = requests.get(f"{url}/v1/model", timeout=10).json()
    assert info["ugsep"] is True and "hist_items" in info["features"]["user"]
    doc = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert "/v1/rank" in doc["paths"] and "requestBody" in doc["paths"]["/v1/rank"]["post"]
    h = serve.get_app_handle(APP)
    res = h.rank.remote(request_rows(4, seed=2)).result(timeout_s=30)
    assert len(res["scores"]) == 4 and res["model_version"] == "v1"
    # concurrent callers share @serve.batch batches; each gets its own rows' scores back
    bodies = [request_rows(3, seed=10 + i, user=10 + i) for i in range(8)]
    outs = [f.result(timeout_s=60) for f in [h.rank.remote(b) for b in bodies]]
    assert max(o["batch_requests"] for o in outs) > 1
    for b, o in zip(bodies, outs):
        assert max(abs(x - y) for x, y in zip(o["scores"], offline_scores(model, b))) < 1e-5


def malformed(rng: random.Random, i: int):
    good = request_rows(3, seed=i)
    kind = i % 20
    b = json.loads(json.dumps(good))
    if kind == 0:
        return b"{not json"
    if kind == 1:
        return json.dumps(good)[: rng.randrange(1, 40)]
    if kind == 2:
        b.pop("user")
    elif kind == 3:
        b["extra"] = 1
    elif kind == 4:
        b["candidates"] = []
    elif kind == 5:
        b["candidates"] = b["candidates"] * 30          # 90 > max_candidates 64
    elif kind == 6:
        return json.dumps(good).replace("0.25", "NaN")
    elif kind == 7:
        return json.dumps(good).replace("0.25", "Infinity")
    elif kind == 8:
        b["user"]["hour"] = "x" * rng.randrange(1, 10)
    elif kind == 9:
        b["user"]["nope"] = 1
    elif kind == 10:
        b["candidates"][0]["hour"] = 3
    elif kind == 11:
        b["user"]["hist_items"] = list(range(50))
    elif kind == 12:
        b["candidates"][rng.randrange(3)]["genres"] = {"a": 1}
    elif kind == 13:
        b["top_k"] = -rng.randrange(0, 5)
    elif kind == 14:
        return b"[]"
    elif kind == 15:
        return b"x" * 70000                              # over max_body_bytes: 413
    elif kind == 16:
        b["user"]["zip_prefix"] = 2**70
    elif kind == 17:
        b["candidates"] = "none"
    elif kind == 18:
        return b"\xff\xfe\x00"
    else:
        b["user"]["score"] = [1.0, 2.0, 3.0]
    return b


def test_fuzz_only_4xx_then_valid(served):
    url, _, _ = served
    rng = random.Random(0)
    statuses = []
    for i in range(220):
        r = post(url, malformed(rng, i))
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (i, r.status_code, r.text[:200])
        assert r.json()["error"] or r.status_code == 413
    assert 413 in statuses and 400 in statuses and 422 in statuses
    ok = post(url, request_rows(5, seed=3))
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 5


def test_metrics_exported_with_component_serve(served):
    """After the requests above: ray_recmix_serve_* series with component="serve" on the node's metrics port."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    url = served[0]
    body = request_rows(3, seed=9, user=4)
    body["candidates"][0]["item_id"] = 10_000     # outside the training vocabulary (40): the unknown path
    assert post(url, body).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    want = {"ray_recmix_serve_requests", "ray_recmix_serve_user_cache", "ray_recmix_serve_candidates",
            "ray_recmix_serve_latency_s", "ray_recmix_serve_model", "ray_recmix_serve_unknown_ids"}
    deadline, seen = time.time() + 45, {}
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        seen = {s.name: s.labels for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name.startswith("ray_recmix_serve") and s.labels.get("component") == "serve"}
        names = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                 for n in seen}
        if want <= names:
            break
        time.sleep(1)
    assert want <= names, sorted(seen)
    assert seen["ray_recmix_serve_model"].get("version"), seen["ray_recmix_serve_model"]


def test_w8a16_replica_serves_scores_close_to_the_float_model(served, tmp_path):
    """`quant: w8a16` on a second app (same proxy, its own route): the replica swaps the per-token FFN weights
    for int8 + fp16 scales at load. Tolerance 5e-3 on the probabilities: the scorer-level bound of
    docs/serving.md on a model whose scores spread over (0, 1) (weights N(0, 0.3); measured <= 7e-4 there).
    The scores must also differ from the float model's, or the switch was not applied."""
    from ray import serve

    from recmix.jobs.serve import deploy

    url, _, spec = served
    root = write_artifact(str(tmp_path / "q"), weight_std=0.3)
    doc = spec.model_dump(mode="json")
    qspec = ServeSpec.model_validate({**doc, "name": "ranker_w8a16", "quant": "w8a16", "artifact": {"uri": root},
                                      "http": {**doc["http"], "route_prefix": "/q"}})
    qurl = deploy(qspec, log=lambda s: None)
    try:
        assert requests.get(f"{qurl}/v1/model", timeout=10).json()["quant"] == "w8a16"
        model = load_artifact(root)
        diffs = []
        for seed in range(3):
            body = request_rows(40, seed=seed, user=seed)
            r = post(qurl, body)
            assert r.status_code == 200, r.text
            diffs += [abs(a - b) for a, b in zip(r.json()["scores"], offline_scores(model, body))]
        assert 1e-6 < max(diffs) < 5e-3, max(diffs)
    finally:
        serve.delete("ranker_w8a16")


def test_shard_group_replica_serves_offline_scores(served, tmp_path):
    """`embeddings.mode: shard_group` on a parameter-server artifact: the replica reads its rows through
    ServingShard actors; served scores equal load_artifact's, and /v1/model shows the hot cache working."""
    from ray import serve

    from recmix.jobs.serve import deploy
    from tests.serve_fixture import write_ps_artifact

    url, _, spec = served
    root = write_ps_artifact(str(tmp_path / "ps"))
    doc = spec.model_dump(mode="json")
    sspec = ServeSpec.model_validate({**doc, "name": "ranker_shards", "artifact": {"uri": root},
                                      "embeddings": {"mode": "shard_group", "shards": 2, "hot_rows": 1024},
                                      "http": {**doc["http"], "route_prefix": "/s"}})
    surl = deploy(sspec, log=lambda s: None)
    try:
        model = load_artifact(root)
        for seed in range(2):
            body = request_rows(16, seed=seed, user=seed)
            r = post(surl, body)
            assert r.status_code == 200, r.text
            assert max(abs(a - b) for a, b in zip(r.json()["scores"], offline_scores(model, body))) < 1e-5
        emb = requests.get(f"{surl}/v1/model", timeout=10).json()["embeddings"]
        assert emb["mode"] == "shard_group" and emb["hot_cache"]["misses"] > 0 and emb["hot_cache"]["hits"] > 0
    finally:
        serve.delete("ranker_shards")


class Load:
    """Closed-loop HTTP clients in threads; every outcome recorded as (status or error name, model_version)."""

    def __init__(self, url: str, threads: int = 2):
        self.url, self.stop, self.out = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                r = post(self.url, request_rows(8, seed=n, user=i))
                self.out.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text[:200]))
            except requests.RequestException as e:
                self.out.append((type(e).__name__, None))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_version_update_under_load_has_no_failed_request(served, tmp_path):
    """Last in the module: it changes the app's model. v1 -> v2 -> v1 (rollback) while clients keep sending."""
    from recmix.jobs.serve import deploy

    url, _, spec = served
    write_artifact(spec.artifact.uri, version="v2", seed=1)
    with Load(url) as load:
        for version in ("v2", "v1"):
            deploy(spec.model_copy(update={"artifact": spec.artifact.model_copy(update={"version": version})}),
                   log=lambda s: None)
            n = len(load.out)
            deadline = time.time() + 30
            while time.time() < deadline and not any(v == version for _, v in load.out[n:]):
                time.sleep(0.2)
            time.sleep(1.0)
            after = [v for _, v in load.out[n:]]
            assert after and after[-1] == version, after[-5:]
    failed = [o for o in load.out if o[0] != 200]
    assert not failed and len(load.out) > 20, (failed[:5], len(load.out))
