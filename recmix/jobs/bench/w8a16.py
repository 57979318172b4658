"""`recmix bench w8a16`: the per-token W8A16 matmul against fp32 and bf16 weights (spec §5.8).

Shape: T = 16 banks, I = 256, O = 1024 (a per-token SwiGLU up-projection), M rows per token in
{1, 16, 32, 64, 256} (M = B_u on the UG-Sep user path). Cases, timed interleaved (one repetition of every case
per round, the order rotated each round, so machine drift and cache warmth hit all alike; the figure is the
fastest round, the least disturbed one on a shared machine, as timeit does):
  fp32             torch.bmm, fp32 weights (the baseline of every ratio)
  bf16             torch.bmm, bf16 weights and activations
  w8a16            the dispatcher `pertoken_linear_w8a16` (CPU backend), bf16 activations
  cand_int8pack    candidate: torch._weight_int8pack_mm per token (weights stay int8)
  cand_cvt_bmm     candidate: int8 -> fp32 copy of the weight per call, fp32 bmm, scale on the output
Weight bandwidth = weight bytes (int8 + fp16 scales for W8A16) / time. On CUDA the Triton kernel is timed
against bf16 torch.bmm instead (skipped without a GPU).

`python -m recmix.jobs.bench.w8a16 --auc SPEC.yaml` trains the model of a train spec once and reports test
AUC before / after `quantize_model` (the end-to-end check of spec §5.8, invariant 30).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from recmix.kernels import w8a16
from recmix.platform.bench import BenchReport

T, I, O = 16, 256, 1024


def _time_rounds(cases: dict[str, Callable[[], object]], budget_s: float, min_rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up (allocator, oneDNN primitive cache)
        fn()
    sync()
    t_start = time.perf_counter()
    names = list(cases)
    rnd = 0
    while True:
        # rotate the order each round: a case that shares weights with the one before it (w8a16 and the int8
        # candidates read the same q) would otherwise always find them warm in cache
        for k in names[rnd % len(names):] + names[: rnd % len(names)]:
            t0 = time.perf_counter()
            cases[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
        rnd += 1
        if len(next(iter(times.values()))) >= min_rounds and time.perf_counter() - t_start > budget_s:
            break
    return {k: min(v) for k, v in times.items()}


def _weights(device: str):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(T, I, O, generator=g) / I**0.5).to(device)
    q, s = w8a16.quantize_w8a16(w)
    return w, q, s


def _cpu_cases(M: int, w, q, s) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, T, I, generator=g)
    x_bf = x.to(torch.bfloat16)
    w_bf = w.to(torch.bfloat16)
    q_TOI = q.transpose(1, 2)
    s_bf, s_f = s.to(torch.bfloat16), s.float()
    return {
        "fp32": lambda: torch.bmm(x.transpose(0, 1), w),
        "bf16": lambda: torch.bmm(x_bf.transpose(0, 1), w_bf),
        "w8a16": lambda: w8a16.pertoken_linear_w8a16_cpu(x_bf, q, s),
        "cand_int8pack": lambda: [torch._weight_int8pack_mm(x_bf[:, t], q_TOI[t], s_bf[t]) for t in range(T)],
        "cand_cvt_bmm": lambda: torch.bmm(x.transpose(0, 1), q.float()) * s_f.unsqueeze(1),
    }


def _gpu_cases(M: int, w, q, s) -> dict[str, Callable[[], object]]:
    from recmix.kernels.w8a16_triton import pertoken_linear_w8a16_triton

    x_bf = torch.randn(M, T, I, device="cuda").to(torch.bfloat16)
    w_bf = w.to(torch.bfloat16)
    return {
        "bf16": lambda: torch.bmm(x_bf.transpose(0, 1), w_bf),
        "w8a16": lambda: pertoken_linear_w8a16_triton(x_bf, q, s),
    }


def run(quick: bool) -> BenchReport:
    Ms = [1, 16, 32, 64, 256]  # 32: next to the int8pack / cvt_bmm switch of the CPU backend
    budget_s, min_rounds = (0.5, 3) if quick else (4.0, 7)
    bytes_of = {"fp32": 4 * T * I * O, "bf16": 2 * T * I * O}
    bytes_of["w8a16"] = bytes_of["cand_int8pack"] = bytes_of["cand_cvt_bmm"] = T * I * O + 2 * T * O
    rows, results = [], {}
    default_threads = torch.get_num_threads()
    # 1 thread = one serving replica per core, and the only stable figure on a shared machine (multi-threaded
    # ATen kernels wait at barriers for descheduled threads); the full run adds the default thread count.
    thread_counts = [1] if quick or default_threads == 1 else [1, default_threads]
    w, q, s = _weights("cpu")
    try:
        for n in thread_counts:
            torch.set_num_threads(n)
            for M in Ms:
                med = _time_rounds(_cpu_cases(M, w, q, s), budget_s, min_rounds, lambda: None)
                for k, t in med.items():
                    r = {"ms": t * 1e3, "vs_fp32": med["fp32"] / t, "vs_bf16": med["bf16"] / t, "weight_bytes": bytes_of[k],
                         "weight_gb_s": bytes_of[k] / t / 1e9}
                    results[f"cpu/threads={n}/M={M}/{k}"] = r
                    rows.append([f"cpu x{n}", M, k, r["ms"], r["vs_fp32"], r["vs_bf16"], r["weight_bytes"], r["weight_gb_s"]])
    finally:
        torch.set_num_threads(default_threads)
    notes = [
        "vs_fp32 / vs_bf16 = baseline time / case time (> 1: faster than the baseline); fastest of interleaved rounds",
        f"w8a16 = the dispatcher: int8pack for M <= {w8a16.INT8PACK_MAX_ROWS} rows per token (I % 8 == 0), cvt_bmm above",
    ]
    if torch.cuda.is_available():
        wg, qg, sg = _weights("cuda")
        for M in Ms:
            med = _time_rounds(_gpu_cases(M, wg, qg, sg), budget_s, min_rounds, torch.cuda.synchronize)
            for k, t in med.items():
                r = {"ms": t * 1e3, "vs_bf16": med["bf16"] / t, "weight_bytes": bytes_of[k], "weight_gb_s": bytes_of[k] / t / 1e9}
                results[f"cuda/M={M}/{k}"] = r
                rows.append(["cuda", M, "triton" if k == "w8a16" else k, r["ms"], float("nan"), r["vs_bf16"], r["weight_bytes"], r["weight_gb_s"]])
    else:
        notes.append("no CUDA device: the Triton-vs-bf16 GPU comparison was skipped")
    return BenchReport(
        title=f"W8A16 per-token matmul, T={T} I={I} O={O}",
        columns=["device", "M", "case", "ms", "vs_fp32", "vs_bf16", "weight_bytes", "weight_GB/s"],
        rows=rows,
        results=results,
        config={"T": T, "I": I, "O": O, "M": Ms, "budget_s": budget_s, "min_rounds": min_rounds, "threads": thread_counts},
        notes=notes,
    )


def quantized_auc(spec_path: str, eval_batch_sizes: tuple[int, ...] = (4096, 16)) -> dict:
    """Train once, then test AUC of the float model and of its W8A16 copy, per evaluation batch size.

    Batch 4096 takes the CPU backend's bmm path (int8 weights, fp32 activations); batch 16 takes the
    int8pack path (int8 weights, bf16 activations), so both halves of W8A16 are measured."""
    import copy

    from recmix.jobs.train import train
    from recmix.jobs.train.loop import evaluate
    from recmix.jobs.train.metrics import paired_bootstrap
    from recmix.models.quantize import quantize_model
    from recmix.platform.specs.load import load_spec

    spec = load_spec(spec_path)
    res = train(spec, write=False, log=lambda m: None)
    model = res["_model"].eval()
    from recmix.jobs.train import load_splits

    _, splits = load_splits(spec)
    test = splits["test"]
    qmodel = quantize_model(copy.deepcopy(model))
    from recmix.models.quantize import W8A16PerTokenLinear

    qlayers = [m for m in qmodel.modules() if isinstance(m, W8A16PerTokenLinear)]
    n_w = sum(m.q_TOI.numel() for m in qlayers)
    out = {"spec": spec_path, "best_epoch": res["best_epoch"], "quantized_layers": len(qlayers), "quantized_weights": n_w,
           "weight_bytes_fp32": 4 * n_w, "weight_bytes_w8a16": n_w + sum(2 * m.scale.numel() for m in qlayers)}
    for bs in eval_batch_sizes:
        a = evaluate(model, test, bs)
        b = evaluate(qmodel, test, bs)
        boot = paired_bootstrap(test.labels[:, 0], b["_probs"][:, 0], a["_probs"][:, 0], test.user_key, n=200)
        out[f"eval_batch={bs}"] = {"auc_fp32": a["auc"], "auc_w8a16": b["auc"], "delta": b["auc"] - a["auc"],
                                   "delta_lo95": boot["lo95"], "delta_hi95": boot["hi95"]}
    return out


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--auc", metavar="SPEC", required=True, help="train spec (kind: train) to train and quantize")
    print(json.dumps(quantized_auc(ap.parse_args().auc), indent=2))
