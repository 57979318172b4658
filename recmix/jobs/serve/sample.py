"""Sample requests against a deployed Ranker (`sample:` of a serve spec; the pipeline's last check).

Request i takes the request-level features (user, history, context) of row r_i of the split and, as its
candidates, the item features of rows r_i, r_i + 1, ... (cyclic). The same combined rows are encoded by the
training loader (`to_arrays`) and scored offline by `load_artifact`'s model, so the agreement covers the
whole serving path: JSON, the request codec, the UG-Sep split with its cache and batching, the replica.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from recmix.platform.errors import RecmixError
from recmix.platform.specs.serve import ServeSpec

FP32_TOLERANCE = 1e-5    # served vs offline, fp32 (docs/serving.md)
W8A16_TOLERANCE = 5e-3   # the documented W8A16 tolerance (reported, not enforced: it grows with the logits)


def build(spec: ServeSpec, artifact_uri: str) -> tuple[list[dict], np.ndarray]:
    """(request bodies, offline scores (requests, candidates)) from the sample's dataset split."""
    import pyarrow as pa

    from recmix.jobs.train.data import to_arrays
    from recmix.jobs.train.loop import predict
    from recmix.models.artifact import load_artifact
    from recmix.platform.dataset import open_dataset

    from .features import FeatureCodec

    cfg = spec.sample
    model = load_artifact(artifact_uri, spec.storage)
    ds = open_dataset(cfg.dataset, spec.storage)
    if ds.schema.model_dump(mode="json") != model.artifact["features"]:
        raise RecmixError(f"sample.dataset {cfg.dataset}: its feature schema differs from the one the artifact "
                          "was trained on")
    codec = FeatureCodec(ds.schema)
    table = ds.read_split(cfg.split)
    N, R, C = table.num_rows, cfg.requests, cfg.candidates
    if N == 0:
        raise RecmixError(f"sample.dataset {cfg.dataset}: split '{cfg.split}' has no rows")
    first_R = np.linspace(0, N - 1, R).astype(np.int64)                         # spread over the split
    req_RC = np.repeat(first_R, C)
    cand_RC = (first_R[:, None] + np.arange(C)[None, :]).reshape(-1) % N
    req_names = {f.name for f in codec.request_features}
    rows = pa.table({name: table.column(name).take(req_RC if name in req_names else cand_RC)
                     for name in table.column_names})
    offline = predict(model, to_arrays(rows, ds.schema), batch_size=4096)[:, 0].reshape(R, C)
    cols = {f.name: rows.column(f.name).to_pylist() for f in ds.schema.inputs}
    bodies = [{"request_id": f"sample-{i}",
               "user": {f.name: cols[f.name][i * C] for f in codec.request_features},
               "candidates": [{f.name: cols[f.name][j] for f in codec.candidate_features}
                              for j in range(i * C, (i + 1) * C)]}
              for i in range(R)]
    return bodies, offline


def send(url: str, bodies: list[dict], clients: int) -> tuple[list, list[float], list[str]]:
    """Closed-loop clients share the bodies; (responses by body, latencies ms, errors)."""
    import requests

    out: list = [None] * len(bodies)
    lat: list[float] = []
    errors: list[str] = []
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        s = requests.Session()
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                r = s.post(f"{url}/v1/rank", json=bodies[i], timeout=60)
            except requests.RequestException as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            out[i] = r.json()
            lat.append(ms)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, lat, errors


def run(spec: ServeSpec, url: str, artifact_uri: str, log: Callable[[str], None]) -> dict:
    cfg = spec.sample
    bodies, offline = build(spec, artifact_uri)
    t0 = time.perf_counter()
    out, lat, errors = send(url, bodies, cfg.clients)
    wall = time.perf_counter() - t0
    served = [(o["scores"], offline[i]) for i, o in enumerate(out) if o is not None]
    diff = max((float(np.max(np.abs(np.asarray(s) - off))) for s, off in served), default=float("nan"))
    hits = sum(bool(o["cache_hit"]) for o in out if o is not None)
    a = np.asarray(lat) if lat else np.full(1, np.nan)
    tol = W8A16_TOLERANCE if spec.quant.value == "w8a16" else FP32_TOLERANCE
    res = {"requests": len(bodies), "candidates": cfg.candidates, "ok": len(lat), "errors": len(errors),
           "qps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
           "max_abs_diff": diff, "tolerance": tol, "agree": bool(diff <= tol), "cache_hits": hits,
           "model_version": out[0]["model_version"] if out and out[0] else None}
    log(f"[serve] sample: {res['ok']}/{len(bodies)} requests x {cfg.candidates} candidates from '{cfg.split}' "
        f"({cfg.clients} clients): p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, {res['qps']:.1f} req/s")
    log(f"[serve] served vs offline scores of the same rows: max |diff| {diff:.2e} (tolerance {tol:g}: "
        f"{'agree' if res['agree'] else 'DISAGREE'})")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} sample requests failed; first: {errors[0]}")
    if spec.quant.value == "off" and not res["agree"]:
        raise RuntimeError(f"served scores differ from the offline scores by {diff:.2e} (> {tol:g})")
    return res
