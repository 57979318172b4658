"""`recmix bench w8a16`: the per-token W8A16 matmul against fp32 and bf16 weights (spec §5.8).

Shape: T = 16 banks, I = 256, O = 1024 (a per-token SwiGLU up-projection), M rows per token in
{1, 16, 32, 64, 256} (M = B_u on the UG-Sep user path). Cases, timed by `torch.utils.benchmark.Timer` in
interleaved rounds (jobs/bench/timing.py; the figure is the fastest round, the least disturbed one on a shared
machine, as timeit does):
  fp32             torch.bmm, fp32 weights (the baseline of every ratio)
  bf16             torch.bmm, bf16 weights and activations
  w8a16            the CPU backend `pertoken_linear_w8a16_cpu`, bf16 activations
  cand_int8pack    candidate: torch._weight_int8pack_mm per token (weights stay int8)
  cand_cvt_bmm     candidate: int8 -> fp32 copy of the weight per call, fp32 bmm, scale on the output
Weight bandwidth = weight bytes (int8 + fp16 scales for W8A16) / time. On CUDA the Triton kernel is timed
against bf16 torch.bmm instead (skipped without a GPU).
"""

from __future__ import annotations

from typing import Callable

import torch

from recmix.jobs.bench.timing import time_cases
from recmix.kernels.w8a16_cpu import INT8PACK_MAX_ROWS, pertoken_linear_w8a16_cpu
from recmix.kernels.w8a16_reference import quantize_w8a16
from recmix.platform.bench import BenchReport

T, I, O = 16, 256, 1024


def _weights(device: str):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(T, I, O, generator=g) / I**0.5).to(device)
    q, s = quantize_w8a16(w)
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
        "w8a16": lambda: pertoken_linear_w8a16_cpu(x_bf, q, s),
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
    # min_run_time per case and round: 5 cases x 3 rounds x 0.03 s per M and thread count in quick mode
    rounds, min_run_time = (3, 0.03) if quick else (7, 0.1)
    bytes_of = {"fp32": 4 * T * I * O, "bf16": 2 * T * I * O}
    bytes_of["w8a16"] = bytes_of["cand_int8pack"] = bytes_of["cand_cvt_bmm"] = T * I * O + 2 * T * O
    rows, results = [], {}
    default_threads = torch.get_num_threads()
    # 1 thread = one serving replica per core, and the only stable figure on a shared machine (multi-threaded
    # ATen kernels wait at barriers for descheduled threads); the full run adds the default thread count.
    thread_counts = [1] if quick or default_threads == 1 else [1, default_threads]
    w, q, s = _weights("cpu")
    for n in thread_counts:
        for M in Ms:
            med = time_cases(_cpu_cases(M, w, q, s), rounds=rounds, min_run_time=min_run_time, num_threads=n)
            for k, t in med.items():
                r = {"ms": t * 1e3, "vs_fp32": med["fp32"] / t, "vs_bf16": med["bf16"] / t, "weight_bytes": bytes_of[k],
                     "weight_gb_s": bytes_of[k] / t / 1e9}
                results[f"cpu/threads={n}/M={M}/{k}"] = r
                rows.append([f"cpu x{n}", M, k, r["ms"], r["vs_fp32"], r["vs_bf16"], r["weight_bytes"], r["weight_gb_s"]])
    notes = [
        "vs_fp32 / vs_bf16 = baseline time / case time (> 1: faster than the baseline); fastest of interleaved Timer rounds",
        f"w8a16 = the CPU backend: int8pack for M <= {INT8PACK_MAX_ROWS} rows per token (I % 16 == 0), cvt_bmm above",
    ]
    if torch.cuda.is_available():
        wg, qg, sg = _weights("cuda")
        for M in Ms:
            med = time_cases(_gpu_cases(M, wg, qg, sg), rounds=rounds, min_run_time=min_run_time, num_threads=default_threads)
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
        config={"T": T, "I": I, "O": O, "M": Ms, "rounds": rounds, "min_run_time_s": min_run_time, "threads": thread_counts,
                "timer": "torch.utils.benchmark.Timer.blocked_autorange"},
        notes=notes,
    )
