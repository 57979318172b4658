"""Benchmark output convention shared by every `recmix bench NAME` (the benches and their registry: recmix.jobs).

A benchmark produces a `BenchReport`. `emit` prints the report's table, then, as the LAST line of stdout,
one JSON object: bench, quick, params, results (figures and ratios), config, and the machine (cores,
torch and ray versions, device). Ratios are always against a baseline measured in the same run.
`--quick` must finish within 60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform as _platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable


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


def emit(
    name: str,
    quick: bool,
    produce: Callable[[], BenchReport],
    *,
    params: dict[str, Any] | None = None,
    out: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run `produce`, print its table and the JSON line (also to `out`), return the JSON payload."""
    t0 = time.perf_counter()
    report = produce()
    payload = {
        "bench": name,
        "quick": quick,
        "params": params or {},
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
