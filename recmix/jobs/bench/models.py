"""`recmix bench models`: CPU forward+backward throughput at matched parameter budgets, and the S-P MoE
FFN wall-time ratio sparse/dense.

Models (full: T=16, D=256, L=4; quick: T=16, D=64, L=2), on the ml-100k-like synthetic schema
(12 features x 16-dim embeddings):
* TokenMixer-Large dense: chunk_per_token tokenizer, H = T, pSwiGLU n = 2.
* TokenMixer-Large S-P MoE 1:2: the same with E = 4 experts (incl. shared), K = 2 active, on F1 and F2.
* RankMixer: same T, D, L, PFFN k = 3n = 6, so its per-block matmul params 2kTD^2 equal TML's 6nTD^2.
* DLRM-MLP: 4 hidden layers of equal width chosen so its MLP params match the TML backbone.
"Matched" = equal backbone (dense, excluding embeddings, tokenizer and heads) parameter count within 3%;
the MoE model holds the same parameters (+ routers) with half the FFN parameters active.

MoE FFN ratio: one per-token FFN position (T=16, D=256, n=4, batch 512 full / 128 quick) as dense pSwiGLU vs
S-P MoE at 1:2 (E=8, K=4 and E=4, K=2), grouped compute, forward and forward+backward, single thread.
"""

from __future__ import annotations

import math
import time

import torch
from pydantic import TypeAdapter

from recmix.jobs.bench.timing import time_cases
from recmix.models import counters
from recmix.models.build import build_model
from recmix.models.moe import SparsePertokenMoE
from recmix.models.token_layers import PerTokenSwiGLU
from recmix.models.toy import toy_batch, toy_schema
from recmix.platform.bench import BenchReport
from recmix.platform.specs.model import ModelConfig, SPMoEConfig

CFG = TypeAdapter(ModelConfig)


def configs(T: int, D: int, L: int, n: float = 2.0) -> dict[str, dict]:
    base = dict(n_tokens=T, d_model=D, n_layers=L, tokenizer="chunk_per_token")
    tml = dict(arch="tokenmixer_large", global_token="none", ffn_mult=n, inter_residual_gap=2, **base)
    target = 6 * n * T * D * D * L
    width_in = 12 * 16
    w = int((-width_in + math.sqrt(width_in ** 2 + 12 * target)) / 6)   # 192w + 3w^2 = target
    return {
        "dlrm_mlp": dict(arch="dlrm_mlp", hidden=[w] * 4),
        "rankmixer": dict(arch="rankmixer", ffn_mult=3 * n, **base),
        "tokenmixer_large": tml,
        "tokenmixer_large_moe_1_2": {**tml, "moe": dict(n_experts=4, n_active=2)},
    }


def _time(fn, reps: int) -> float:
    """Min CPU seconds of this process per call (single thread): robust to other load on a shared
    machine, where wall time mostly measures the scheduler. Timer's block-size estimate is the warm-up."""
    return time_cases({"fn": fn}, rounds=reps, min_run_time=0.0, num_threads=1, timer=time.process_time)["fn"]


def _throughput(cfg_dict: dict, batch: int, reps: int) -> tuple[dict, float]:
    schema = toy_schema(emb_dim=16)
    cfg = CFG.validate_python(cfg_dict)
    torch.manual_seed(0)
    model = build_model(cfg, schema).train()
    b = toy_batch(schema, batch, seed=0)

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(model(b), b["labels"])
        loss.backward()

    sec = _time(step, reps)
    return counters.model(cfg, schema), batch / sec


def _ffn_ratio(batch: int, reps: int, E: int, K: int) -> dict:
    T, D, n = 16, 256, 4
    torch.manual_seed(0)
    dense = PerTokenSwiGLU(T, D, n * D)
    moe = SparsePertokenMoE(T, D, n * D, SPMoEConfig(n_experts=E, n_active=K))
    x = torch.randn(batch, T, D, requires_grad=True)
    out = {}
    for mode in ("fwd", "fwd_bwd"):
        def run(m):
            y = m(x)[0] if m is moe else m(x)   # the MoE returns (y, balance loss)
            if mode == "fwd_bwd":
                y.sum().backward()
        td, ts = _time(lambda: run(dense), reps), _time(lambda: run(moe), reps)
        out[mode] = {"dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "ratio": ts / td}
    return out


def run(quick: bool = False) -> BenchReport:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)   # single-thread figures: the 2-core box is shared, threads only add noise
    try:
        T, D, L = (16, 64, 2) if quick else (16, 256, 4)
        batch, reps = (64, 1) if quick else (256, 3)
        rows, res = [], {"models": {}, "moe_ffn": {}, "timing": "process CPU time, 1 thread"}
        base_sps = None
        for name, c in configs(T, D, L).items():
            counts, sps = _throughput(c, batch, reps)
            base_sps = base_sps or sps
            if name == "dlrm_mlp":
                d, h = counts["dense"], counts["heads"]
                bb = {k: d[k] - h[k] for k in d}
            else:
                bb = counts["backbone"]
            res["models"][name] = {"samples_per_s": sps, "backbone_params": bb["params"], "active_params": bb["active_params"],
                                   "flops_per_sample": counts["dense"]["flops"], "dense_params": counts["dense"]["params"],
                                   "vs_dlrm": sps / base_sps}
            rows.append([name, bb["params"], bb["active_params"], counts["dense"]["flops"], round(sps, 1), round(sps / base_sps, 3)])
        fb, fr = (64, 1) if quick else (512, 3)
        for E, K in ((8, 4), (4, 2)):
            r = _ffn_ratio(fb, fr, E, K)
            res["moe_ffn"][f"E{E}_K{K}"] = r
            for mode, v in r.items():
                rows.append([f"S-P MoE FFN E={E} K={K} {mode}", "", "", "", f"{v['sparse_ms']:.1f} / {v['dense_ms']:.1f} CPU-ms",
                             round(v["ratio"], 3)])
        tml = res["models"]["tokenmixer_large"]["backbone_params"]
        res["param_match"] = {k: v["backbone_params"] / tml for k, v in res["models"].items()}
        notes = [f"models: T={T}, D={D}, L={L}, batch {batch}, forward+backward, 1 thread; ratio column = samples/s vs DLRM-MLP",
                 "MoE FFN rows: sparse / dense CPU time of one per-token FFN (T=16, D=256, n=4, batch "
                 f"{fb}); target ratio <= 0.65 at 1:2",
                 "backbone params relative to TokenMixer-Large: " + ", ".join(f"{k} {v:.3f}" for k, v in res["param_match"].items())]
        return BenchReport(title="models: CPU throughput at matched parameters; S-P MoE FFN sparse/dense",
                           columns=["model", "backbone params", "active params", "FLOPs/sample", "samples/CPU-s (fwd+bwd)", "ratio"],
                           rows=rows, results=res, config={"T": T, "D": D, "L": L, "batch": batch, "quick": quick},
                           notes=notes)
    finally:
        torch.set_num_threads(saved)
