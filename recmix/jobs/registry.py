"""Every job kind's runner, by kind: the one table the CLI and pipelines dispatch through (benches: recmix.jobs.bench).

Imports are real statements inside small loaders, so `recmix validate` / `schema` import no job module (torch,
Ray Data) until one runs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from recmix.platform.errors import RecmixError
from recmix.platform.specs.cluster import ClusterConfig

Runner = Callable[[Any, ClusterConfig], Any]  # run(spec, cluster) -> summary


def _prepare(restart: bool) -> Runner:
    from recmix.jobs.prepare import run

    return run


def _bench(restart: bool) -> Runner:
    from recmix.jobs.bench import run

    return run


def _pipeline(restart: bool) -> Runner:
    from recmix.jobs.pipeline import run

    return functools.partial(run, stage_runner=functools.partial(runner, restart=restart))


def _train(restart: bool) -> Runner:
    from recmix.jobs.train import run

    return functools.partial(run, restart=restart)


def _serve(restart: bool) -> Runner:
    from recmix.jobs.serve import run

    return run


# restart: a train job starts afresh instead of resuming its interrupted run (`recmix run --restart`)
RUNNERS: dict[str, Callable[[bool], Runner]] = {"prepare": _prepare, "bench": _bench, "pipeline": _pipeline, "train": _train, "serve": _serve}


def runner(kind: str, restart: bool = False) -> Runner:
    if kind not in RUNNERS:
        raise RecmixError(f"unknown job kind '{kind}' (known: {', '.join(sorted(RUNNERS))})")
    return RUNNERS[kind](restart)
