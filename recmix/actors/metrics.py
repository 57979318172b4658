"""Shard metrics through `ray.util.metrics` (exported as `ray_recmix_ps_*`, ray.md 7).

Tagged component="ps" and group=<embedding.name> (the shard group), then per shard and table: rows per tier (gauges), hit rate per tier (gauges, cumulative), evictions,
admissions, rejections, expiries (counters), and pull / push handler latency (histograms, seconds).
"""

from __future__ import annotations

LATENCY_BOUNDS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
_COUNTERS = {"evicted": "recmix_ps_evictions", "admitted": "recmix_ps_admissions",
             "rejected": "recmix_ps_rejections", "expired": "recmix_ps_expiries"}


class ShardMetrics:
    def __init__(self, shard_id: int, group: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        keys = ("component", "group", "shard", "table")
        self.shard = str(shard_id)
        self.rows = Gauge("recmix_ps_rows", description="rows held per tier", tag_keys=keys + ("tier",))
        self.hit_rate = Gauge("recmix_ps_hit_rate", description="fraction of looked-up ids served by a tier "
                              "(ram, lmdb) or missing (miss), since the shard started", tag_keys=keys + ("tier",))
        self.counters = {k: Counter(n, description=f"rows {k} by the shard", tag_keys=keys) for k, n in _COUNTERS.items()}
        self.latency = Histogram("recmix_ps_latency_s", description="shard handler time per request",
                                 boundaries=LATENCY_BOUNDS, tag_keys=("component", "group", "shard", "op"))
        for m in (self.rows, self.hit_rate, self.latency, *self.counters.values()):
            m.set_default_tags({"component": "ps", "group": group})
        self.last: dict[str, dict[str, int]] = {}

    def observe(self, op: str, seconds: float) -> None:
        self.latency.observe(seconds, tags={"shard": self.shard, "op": op})

    def update(self, counts: dict) -> None:
        """counts: ShardCore.counts(); counters get the increase since the previous update."""
        for table, c in counts.items():
            tags = {"shard": self.shard, "table": table}
            self.rows.set(c["ram"], tags={**tags, "tier": "ram"})
            self.rows.set(c["lmdb"], tags={**tags, "tier": "lmdb"})
            seen = c["ram_hits"] + c["lmdb_hits"] + c["misses"]
            if seen:
                for tier, k in (("ram", "ram_hits"), ("lmdb", "lmdb_hits"), ("miss", "misses")):
                    self.hit_rate.set(c[k] / seen, tags={**tags, "tier": tier})
            prev = self.last.get(table, {})
            for k, counter in self.counters.items():
                d = c[k] - prev.get(k, 0)
                if d > 0:
                    counter.inc(d, tags=tags)
            self.last[table] = dict(c)
