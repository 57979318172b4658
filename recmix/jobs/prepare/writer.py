"""Write a prepared dataset version and publish it atomically.

Layout (docs/data.md): `<uri>/<version>/<split>/part-NNNNN.parquet` plus `<uri>/_manifest.json`, written
last. A reader opens the manifest first and only ever sees a complete version; older version folders are
deleted after the new manifest is in place.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import FeatureSchema

FORMAT = "recmix-dataset-v1"
MANIFEST = "_manifest.json"
SPLITS = ("train", "valid", "test")
VERSION_RE = re.compile(r"^v\d{8}T\d{6}Z-[0-9a-f]{8}$")


def new_version() -> str:
    return f"v{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def part_path(version: str, split: str, index: int) -> str:
    return f"{version}/{split}/part-{index:05d}.parquet"


@dataclass
class SplitStats:
    """Per-split totals, mergeable across chunks written by different workers."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    positives: float = 0.0
    ts_min: int | None = None
    ts_max: int | None = None

    def add(self, path: str, rows: int, positives: float, ts_min: int, ts_max: int) -> None:
        self.files.append(path)
        if rows == 0:
            return
        self.rows += rows
        self.positives += positives
        self.ts_min = ts_min if self.ts_min is None else min(self.ts_min, ts_min)
        self.ts_max = ts_max if self.ts_max is None else max(self.ts_max, ts_max)

    def to_json(self) -> dict:
        return {"files": sorted(self.files), "rows": self.rows,
                "label_rate": round(self.positives / self.rows, 6) if self.rows else None,
                "ts_min": self.ts_min, "ts_max": self.ts_max}


def write_part(fs: pafs.FileSystem, root: str, rel: str, table: pa.Table, label: str) -> tuple:
    """Write one parquet file; returns (rel, rows, positives, ts_min, ts_max) for `SplitStats.add`."""
    path = storage.join(root, rel)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        storage.write_via_temp(fs, path, lambda tmp: pq.write_table(table, tmp, filesystem=fs, compression="zstd",
                                                                     row_group_size=256 * 1024))
    except OSError as e:
        raise RecmixError(f"cannot write {path}: {storage.describe(e)}") from None
    if table.num_rows == 0:
        return (rel, 0, 0.0, None, None)
    ts = pc.min_max(table.column("timestamp"))
    return (rel, table.num_rows, float(pc.sum(table.column(label)).as_py() or 0.0), ts["min"].as_py(), ts["max"].as_py())


def split_bounds(n_rows: int, fractions) -> dict[str, tuple[int, int]]:
    """Row ranges [start, stop) of train/valid/test after the global sort (rounded, test takes the rest)."""
    a = int(round(n_rows * fractions.train))
    b = int(round(n_rows * (fractions.train + fractions.valid)))
    b = max(a, min(b, n_rows))
    return {"train": (0, a), "valid": (a, b), "test": (b, n_rows)}


# Files per split at least (when it has that many rows): Ray Data reads files in parallel tasks and streams them
# to the training workers, so a split in one file is read by one task however many workers there are.
MIN_FILES = 4


def write_sorted_table(fs, root: str, version: str, table: pa.Table, fractions, label: str,
                       rows_per_file: int, min_files: int = MIN_FILES) -> dict[str, SplitStats]:
    """Split an already time-sorted table by position and write each split in files of at most `rows_per_file`
    rows, and in at least `min_files` files of near-equal size (fewer when the split has fewer rows)."""
    stats = {s: SplitStats() for s in SPLITS}
    for split, (start, stop) in split_bounds(table.num_rows, fractions).items():
        n = stop - start
        n_files = max(1, -(-n // rows_per_file), min(min_files, n))
        # an empty split still gets one (empty) file with the schema
        for i in range(n_files):
            lo, hi = start + n * i // n_files, start + n * (i + 1) // n_files
            stats[split].add(*write_part(fs, root, part_path(version, split, i), table.slice(lo, hi - lo), label))
    return stats


def publish(fs: pafs.FileSystem, root: str, version: str, schema: FeatureSchema, stats: dict[str, SplitStats],
            source: dict) -> dict:
    """Write the manifest (atomically), then delete every other version folder under `root`."""
    manifest = {
        "format": FORMAT,
        "version": version,
        "features": schema.model_dump(mode="json"),
        "timestamp_column": "timestamp",
        "splits": {s: stats[s].to_json() for s in SPLITS},
        "source": source,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    storage.write_bytes_atomic(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type is pafs.FileType.Directory and VERSION_RE.match(info.base_name) and info.base_name != version:
            fs.delete_dir(info.path)
    return manifest

