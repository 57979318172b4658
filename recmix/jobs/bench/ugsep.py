"""`recmix bench ugsep`: per-request latency of UG-Sep against the unmasked TokenMixer-Large baseline.

One request = one user and C candidates (the ml-100k feature schema, random ids). Cases, all with the
same T, D, H, L and weights layout:
  baseline      TokenMixer-Large without user tokens: every candidate row runs every bank
  ugsep_1:1     UG-Sep full forward (dedups the request's user, user path once, candidate path C times)
  ugsep_3:1     same at U:G 3:1
  cached_1:1    UG-Sep 1:1 scoring with the user state already computed (`score` only)
Latency: `torch.utils.benchmark.Timer` in interleaved rounds at the process's thread count (baseline and
variants alternate, so drift hits all cases alike; the figure is the median of the round medians); the measured ratio is printed beside the FLOPs ratio (1 - rho) + rho/C (+ IC) from
`recmix.models.ugsep_counters`.
"""

from __future__ import annotations

import torch
from pydantic import TypeAdapter

from recmix.jobs.bench.timing import time_cases
from recmix.jobs.prepare.builtin import builtin_schema
from recmix.models.build import build_model
from recmix.models.toy import toy_batch
from recmix.models.ugsep_counters import request_flops
from recmix.platform.bench import BenchReport
from recmix.platform.specs.model import ModelConfig


def _model(schema, T, D, L, ugsep: dict):
    spec = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="none", n_tokens=T, d_model=D,
                n_layers=L, ffn_mult=4.0, aux_loss={"mode": "off"}, ugsep=ugsep)
    torch.manual_seed(0)
    return build_model(TypeAdapter(ModelConfig).validate_python(spec), schema).eval()


def _request(schema, C: int, seed: int):
    user = toy_batch(schema, 1, seed)
    cands = toy_batch(schema, C, seed + 1)
    user_groups = {g.name for g in schema.groups if g.side.value == "user"}
    user_names = [f.name for f in schema.inputs if f.group in user_groups]
    full = {n: (user[n].expand(C, *user[n].shape[1:]).contiguous() if n in user_names else cands[n]) for n in cands if n != "labels"}
    return full


def run(quick: bool) -> BenchReport:
    T, D, L = (16, 64, 2) if quick else (16, 128, 2)
    Cs = [16, 64, 256] if quick else [16, 64, 256, 1024]
    rounds, min_run_time = (3, 0.05) if quick else (5, 0.2)
    schema = builtin_schema(n_users=943, n_items=1682, history_len=50)
    models = {
        "baseline": _model(schema, T, D, L, {"user_tokens": 0}),
        "ugsep_1:1": _model(schema, T, D, L, {"user_tokens": "1:1"}),
        "ugsep_3:1": _model(schema, T, D, L, {"user_tokens": "3:1"}),
    }
    ug11 = models["ugsep_1:1"]
    rows, results = [], {}
    with torch.inference_mode():
        for C in Cs:
            full = _request(schema, C, seed=C)
            user = {n: full[n][:1] for n in ug11.user_names}
            cands = {n: full[n] for n in ug11.cand_names}
            zeros = torch.zeros(C, dtype=torch.long)
            state = ug11.encode_user(user)
            calls = {name: (lambda m=m: m(full)) for name, m in models.items()}
            calls["cached_1:1"] = lambda: ug11.score(state, cands, zeros)
            med = time_cases(calls, rounds=rounds, min_run_time=min_run_time, num_threads=torch.get_num_threads(), reduce="median")
            for k in calls:
                ref = models.get(k) or ug11
                fr = 1.0
                if k != "baseline":
                    f = request_flops(ref, C)
                    cached = k.startswith("cached")
                    fr = (f["ugsep_backbone"] - (f["user_backbone"] if cached else 0)) / f["baseline_backbone"]
                ratio = med[k] / med["baseline"]
                rows.append([C, k, med[k] * 1e3, ratio, fr])
                results[f"C{C}/{k}"] = {"latency_ms": round(med[k] * 1e3, 4), "ratio_vs_baseline": round(ratio, 4),
                                        "flops_ratio": round(fr, 4)}
    results["target"] = {"C": 256, "case": "ugsep_1:1", "max_ratio": 0.60,
                         "measured": results.get("C256/ugsep_1:1", {}).get("ratio_vs_baseline")}
    return BenchReport(
        title=f"UG-Sep per-request latency, one user + C candidates (T={T}, D={D}, H={T}, L={L}, ffn_mult 4, CPU fp32)",
        columns=["C", "case", "latency ms", "ratio vs baseline", "FLOPs ratio"],
        rows=rows, results=results,
        config={"T": T, "D": D, "L": L, "threads": torch.get_num_threads(), "candidates": Cs, "rounds": rounds,
                "min_run_time_s": min_run_time, "timer": "torch.utils.benchmark.Timer.blocked_autorange"},
        notes=["FLOPs ratio counts the blocks' per-token matmuls (1 - rho) + rho/C + IC; measured latency also "
               "includes embeddings, tokenizers, heads and the user dedup"],
    )
