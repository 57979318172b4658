"""The driver's side of a run's progress: rank 0's lines and figures arrive through a Ray queue; the lines are
printed, the figures become the `recmix_train_*` gauges (recmix/platform/metrics.py).

[choice] The driver exports the gauges, not rank 0: Ray 2.60's metrics agent evicts a gauge series that was
not set again within two export intervals (`metrics_report_interval_ms`, 10 s by default: a 20 s TTL; a gauge
set once vanished 27-30 s later, measured), and a worker killed at the end of the run may never export what
it set last (a driver that disconnects does flush). The driver outlives the workers, keeps one series across
worker-group restarts, and re-sets the latest figures every `HEARTBEAT_S` while the run lives; the last
figures stay visible for about 20 s after the run ends (report.json keeps them for good).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

HEARTBEAT_S = 5.0     # < the agent's 20 s gauge TTL, with room for one late export
FIGURES = ("step", "epoch", "loss", "train_loss", "valid_auc", "samples_per_s")


class TrainGauges:
    """The registered train gauges of one run (tag group = the run's name); `set` keeps the latest figures,
    `refresh` sets them again."""

    def __init__(self, run_name: str, make: Callable | None = None):
        from recmix.platform import metrics

        make = make or metrics.make   # tests pass a fake: ray.util.metrics needs a connected Ray
        self._gauges = {k: make(f"recmix_train_{k}", component="train", group=run_name) for k in FIGURES}
        self.latest: dict[str, float] = {}

    def set(self, figures: dict) -> None:
        self.latest.update({k: float(v) for k, v in figures.items() if k in self._gauges and isinstance(v, (int, float))})
        self.refresh()

    def refresh(self) -> None:
        for k, v in self.latest.items():
            self._gauges[k].set(v)


class Progress:
    """Pumps the queue in a thread: a str is a progress line for `log`, a dict a set of figures for the gauges."""

    def __init__(self, log: Callable[[str], None], gauges: TrainGauges | None = None, heartbeat_s: float = HEARTBEAT_S):
        from ray.util.queue import Queue

        self.queue, self.log, self.gauges, self.heartbeat_s = Queue(actor_options={"num_cpus": 0}), log, gauges, heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _take(self, item) -> None:
        if isinstance(item, dict):
            if self.gauges is not None:
                self.gauges.set(item)
        else:
            self.log(item)

    def _pump(self) -> None:
        from ray.util.queue import Empty

        beat = time.monotonic()
        while not self._stop.is_set():
            try:
                self._take(self.queue.get(timeout=0.5))
            except Empty:
                pass
            except Exception:   # the queue actor went away (cluster shutting down)
                return
            if self.gauges is not None and time.monotonic() - beat >= self.heartbeat_s:
                beat = time.monotonic()
                self.gauges.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        while True:
            try:
                self._take(self.queue.get_nowait())
            except Exception:
                break
        self.queue.shutdown()
