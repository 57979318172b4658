"""Benchmarks by name (`recmix bench NAME`, `kind: bench`): the table, and the runner that prints a bench's report.

Each bench module has `run(quick[, params]) -> BenchReport`; the loaders import it only when it runs, so
`recmix bench --help` stays fast. Names and parameters are typed in recmix.platform.specs.bench.BENCH_PARAMS;
tests/unit/test_imports.py checks that both tables name the same benches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from recmix.platform.bench import BenchReport, emit
from recmix.platform.errors import RecmixError
from recmix.platform.specs.bench import BenchSpec
from recmix.platform.specs.cluster import ClusterConfig


@dataclass(frozen=True)
class Bench:
    description: str  # one line, shown by `recmix bench --help`
    run: Callable[[bool, Any], BenchReport]  # (quick, params of platform.specs.bench.BENCH_PARAMS[name])


def _datagen(quick: bool, params: Any) -> BenchReport:
    from . import datagen

    return datagen.run(quick)


def _lmn(quick: bool, params: Any) -> BenchReport:
    from . import lmn

    return lmn.run(quick, params)


def _models(quick: bool, params: Any) -> BenchReport:
    from . import models

    return models.run(quick)


def _ps(quick: bool, params: Any) -> BenchReport:
    from . import ps

    return ps.run(quick)


def _quality(quick: bool, params: Any) -> BenchReport:
    from . import quality

    return quality.run(quick, params)


def _serve(quick: bool, params: Any) -> BenchReport:
    from . import serve

    return serve.run(quick, params)


def _train(quick: bool, params: Any) -> BenchReport:
    from . import train

    return train.run(quick, params)


def _ugsep(quick: bool, params: Any) -> BenchReport:
    from . import ugsep

    return ugsep.run(quick)


def _ugsep_quality(quick: bool, params: Any) -> BenchReport:
    from . import ugsep_quality

    return ugsep_quality.run(quick, params)


def _w8a16(quick: bool, params: Any) -> BenchReport:
    from . import w8a16

    return w8a16.run(quick)


BENCHES: dict[str, Bench] = {
    "datagen": Bench("synthetic prepare throughput and memory vs a plain-pyarrow baseline", _datagen),
    "lmn": Bench("LMN memory reads: product keys in-process and via the memory shards vs a flat top-K over N slots", _lmn),
    "models": Bench("CPU fwd+bwd throughput at matched parameters; S-P MoE FFN sparse/dense time", _models),
    "ps": Bench("embedding parameter server vs in-process baselines (pull/push, cold tier, scaling)", _ps),
    "quality": Bench("test AUC of DLRM-MLP, RankMixer, TokenMixer-Large (dense, MoE) per seed on one dataset", _quality),
    "serve": Bench("Ranker on Ray Serve over HTTP: QPS, p50/p99 of baseline vs UG-Sep, user-cache hit vs miss", _serve),
    "train": Bench("Ray Train samples/s with 1 and 2 workers, parameter server vs local tables, Ray Data feed rate", _train),
    "ugsep": Bench("UG-Sep per-request latency vs unmasked TokenMixer-Large, beside the FLOPs ratio", _ugsep),
    "ugsep_quality": Bench("test AUC of UG-Sep 1:1 / 3:1 (with, without IC) vs TokenMixer-Large per seed", _ugsep_quality),
    "w8a16": Bench("per-token W8A16 matmul vs fp32 and bf16 weights (CPU; Triton on CUDA)", _w8a16),
}


def bench(name: str) -> Bench:
    if name not in BENCHES:
        raise RecmixError(f"unknown benchmark '{name}' (known: {', '.join(sorted(BENCHES))})")
    return BENCHES[name]


def run_bench(spec: BenchSpec, echo: Callable[[str], None] = print) -> dict:
    """Print the bench's table and, as the last line, its JSON object; return that object."""
    fn = bench(spec.name).run
    return emit(spec.name, spec.quick, lambda: fn(spec.quick, spec.params), params=spec.params.model_dump(mode="json"),
                out=spec.out, echo=echo)


def run(spec: BenchSpec, cluster: ClusterConfig) -> dict:
    """`kind: bench` runner (benches start their own Ray cluster where they need one)."""
    return run_bench(spec)
