"""Benchmark convention shared by every `recmix bench NAME`.

A benchmark is a function `run(quick: bool) -> BenchReport`. The runner prints the report's table,
then, as the LAST line of stdout, one JSON object: name, quick, results (figures and ratios),
config, and the machine (cores, torch and ray versions, device). Ratios are always against a
baseline measured in the same run. `--quick` must finish within 60 s on 2 cores.
"""

from __future__ import annotations

import importlib
import json
import os
import platform as _platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# name -> "module:function". Strings, so the platform layer imports nothing above it until a bench runs.
_REGISTRY: dict[str, str] = {
    "datagen": "recmix.jobs.bench.datagen:run",
    "ugsep": "recmix.jobs.bench.ugsep:run",
    "ugsep_quality": "recmix.jobs.bench.ugsep_quality:run",
    "ps": "recmix.jobs.bench.ps:run",
    "models": "recmix.jobs.bench.models:run",
    "quality": "recmix.jobs.bench.quality:run",
    "w8a16": "recmix.jobs.bench.w8a16:run",
}


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def registered() -> dict[str, str]:
    return dict(_REGISTRY)


@dataclass
class BenchReport:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "python": _platform.python_version(), "cpu": _platform.processor() or _platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        info["device"] = "cpu"
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def format_table(report: BenchReport) -> str:
    cells = [[str(c) for c in report.columns]] + [[_fmt(v) for v in row] for row in report.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(report.columns))]
    lines = [report.title, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def resolve(name: str) -> Callable[[bool], BenchReport]:
    from recmix.platform.errors import RecmixError

    if name not in _REGISTRY:
        raise RecmixError(f"unknown benchmark '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    module, _, fn = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def run_bench(name: str, quick: bool = False, out: str | None = None, echo: Callable[[str], None] = print) -> dict:
    fn = resolve(name)
    t0 = time.perf_counter()
    report = fn(quick)
    payload = {
        "bench": name,
        "quick": quick,
        "results": report.results,
        "config": report.config,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    line = json.dumps(payload, default=float, sort_keys=False)
    if out:
        with open(out, "w") as f:
            f.write(format_table(report) + "\n" + line + "\n")
    echo(format_table(report))
    echo(line)
    return payload
