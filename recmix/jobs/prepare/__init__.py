"""`kind: prepare`: MovieLens-100K, synthetic or any parquet -> a prepared dataset (docs/data.md).

`run(spec, cluster)` writes `<output.uri>/<version>/<split>/part-*.parquet`, then `_manifest.json`, and
returns a summary dict (uri, version, per-split rows / label rate / timestamp range).
"""

from __future__ import annotations

import datetime as _dt
import time

from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.secrets import redact
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.prepare import MovieLensSource, ParquetSource, PrepareSpec, SyntheticSource

from . import writer
from .columns import conform


def _utc(ts) -> str:
    return "-" if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _report(spec: PrepareSpec, manifest: dict, seconds: float) -> dict:
    splits = manifest["splits"]
    total = sum(s["rows"] for s in splits.values())
    print(f"[prepare] {spec.source.type} -> {redact(spec.output.uri)} version {manifest['version']}: {total:,} rows in {seconds:.1f}s")
    for name, s in splits.items():
        rate = "-" if s["label_rate"] is None else f"{s['label_rate']:.4f}"
        print(f"[prepare]   {name:<5} {s['rows']:>12,} rows  label rate {rate}  "
              f"ts {s['ts_min']} .. {s['ts_max']}  ({_utc(s['ts_min'])} .. {_utc(s['ts_max'])} UTC)  {len(s['files'])} file(s)")
    return {"uri": redact(spec.output.uri), "version": manifest["version"], "rows": total, "seconds": round(seconds, 2),
            "splits": {k: {kk: v for kk, v in s.items() if kk != "files"} for k, s in splits.items()}}


def run(spec: PrepareSpec, cluster: ClusterConfig) -> dict:
    storage.check_writable(spec.output.uri, spec.storage)  # before any work
    version = writer.new_version()
    published: list[dict] = []
    try:
        return _run(spec, cluster, version, published)
    except BaseException as e:
        if not published:  # an unpublished version is referenced by nothing: partial parts go with it
            _discard(spec, version)
        if isinstance(e, OSError):  # storage trouble past the first check (endpoint gone, disk full): one line
            raise RecmixError(f"prepare {spec.output.uri}: {storage.describe(e, spec.storage)}") from None
        raise


def _discard(spec: PrepareSpec, version: str) -> None:
    from recmix.platform.cleanup import no_interrupt

    with no_interrupt():
        try:
            fs, root = storage.resolve(spec.output.uri, spec.storage)
            fs.delete_dir(storage.join(root, version))
        except OSError:
            pass  # never written, or the store is gone: the next publish deletes stray version folders


def _run(spec: PrepareSpec, cluster: ClusterConfig, version: str, published: list) -> dict:
    t0 = time.perf_counter()
    fs, root = storage.resolve(spec.output.uri, spec.storage)
    src = spec.source
    if isinstance(src, MovieLensSource):
        from . import movielens

        blobs = movielens.read_files(src, spec.storage)
        schema = spec.features or movielens.schema(src)
        table = conform(movielens.build_table(blobs, src.history_len), schema, f"movielens100k source {src.path}")
        label = schema.labels[0].name
        stats = writer.write_sorted_table(fs, root, version, table, spec.splits, label, max(1, table.num_rows))
        source = redact({"type": src.type, "path": src.path, "checksums": src.checksums.value, "history_len": src.history_len})
    elif isinstance(src, SyntheticSource):
        from . import synthetic

        schema = spec.features or synthetic.schema(src)
        stats = synthetic.generate(src, schema, spec.splits, spec.output.uri, spec.storage, version, cluster)
        source = redact(src.model_dump(mode="json"))
    else:
        assert isinstance(src, ParquetSource)
        from . import parquet_source

        schema = spec.features
        table = parquet_source.read(src, schema, spec.storage)
        stats = writer.write_sorted_table(fs, root, version, table, spec.splits, schema.labels[0].name, src.rows_per_file)
        source = redact(src.model_dump(mode="json"))
    manifest = writer.publish(fs, root, version, schema, stats, source)
    published.append(manifest)
    seconds = time.perf_counter() - t0
    if not isinstance(src, SyntheticSource):   # the synthetic chunk tasks export their own rows
        _export(spec, cluster, sum(s["rows"] for s in manifest["splits"].values()), seconds)
    return _report(spec, manifest, seconds)


def _export(spec: PrepareSpec, cluster: ClusterConfig, rows: int, seconds: float) -> None:
    """rows and rows/s of a prepare written by this process (MovieLens, parquet), as the synthetic chunk tasks
    export theirs (group: the dataset's name). On a Ray cluster only: the one this process is connected to,
    or the one it would join (`address`, or `RAY_ADDRESS` inside a Ray job); a standalone run starts none for
    two numbers. A driver's metrics reach the node's agent at the latest when it disconnects."""
    import os
    import sys

    from recmix.platform import cluster as ray_cluster
    from recmix.platform.metrics import make

    ray = sys.modules.get("ray")   # not imported: not connected (a standalone prepare never imports Ray)
    connected = ray is not None and ray.is_initialized()
    if not connected and cluster.address == "local" and not os.environ.get("RAY_ADDRESS", "").strip():
        return
    with ray_cluster.cluster(cluster):
        tags = {"component": "prepare", "group": spec.output.uri.rstrip("/").rsplit("/", 1)[-1] or "dataset"}
        make("recmix_prepare_rows", **tags).inc(rows)
        make("recmix_prepare_rows_per_s", **tags).set(rows / max(seconds, 1e-9))
