"""Read a prepared dataset (written by `kind: prepare`, layout in docs/data.md).

    ds = open_dataset("s3://bucket/ml100k", StorageConfig(endpoint_url=...))
    ds.schema                      # FeatureSchema, from the manifest
    ds.read_split("train")         # pyarrow.Table
    ray.data.read_parquet(ds.split_files("train"), filesystem=ds.filesystem)

The manifest is read once at open: a reader keeps seeing the version it opened until the writer deletes
that version's folder (after publishing a newer one); reopen to pick up a new version.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recmix.platform import storage as _storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import FeatureSchema, StorageConfig, check_uri

FORMAT = "recmix-dataset-v1"
MANIFEST = "_manifest.json"
SPLITS = ("train", "valid", "test")


class PreparedDataset:
    def __init__(self, uri: str, filesystem: pafs.FileSystem, root: str, manifest: dict):
        self.uri = uri
        self.filesystem = filesystem
        self.root = root
        self.manifest = manifest
        self.schema = FeatureSchema.model_validate(manifest["features"])

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise RecmixError(f"{self.uri}: unknown split '{split}' (known: {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def split_files(self, split: str) -> list[str]:
        """Paths on `self.filesystem` (absolute local paths, or `bucket/key` on S3)."""
        return [_storage.join(self.root, rel) for rel in self._split(split)["files"]]

    def rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def read_split(self, split: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        known = {f.name for f in self.schema.features} | {"timestamp", "user_key"}
        if columns is not None:
            unknown = [c for c in columns if c not in known]
            if unknown:
                raise RecmixError(f"{self.uri}: unknown columns {unknown} (known: {sorted(known)})")
        files = self.split_files(split)
        try:
            tables = [pq.read_table(p, columns=list(columns) if columns is not None else None, filesystem=self.filesystem)
                      for p in files]
        except (OSError, pa.ArrowInvalid) as e:
            raise RecmixError(f"{self.uri}: cannot read split '{split}' of version {self.version}: {str(e).splitlines()[0]}") from None
        if not tables:  # the writer puts at least one (possibly empty) file in every split
            raise RecmixError(f"{self.uri}: split '{split}' of version {self.version} lists no files")
        return pa.concat_tables(tables)

    def __repr__(self) -> str:
        rows = {s: v["rows"] for s, v in self.manifest["splits"].items()}
        return f"PreparedDataset({self.uri!r}, version={self.version!r}, rows={rows})"


def open_dataset(uri: str, storage: Optional[StorageConfig] = None) -> PreparedDataset:
    """Open `<uri>/_manifest.json`; a missing manifest or unreadable URI is a one-line RecmixError."""
    try:
        check_uri(uri)
    except ValueError as e:
        raise RecmixError(str(e)) from None
    try:
        fs, root = _storage.resolve(uri, storage)
        raw = fs.open_input_stream(_storage.join(root, MANIFEST)).read()
    except FileNotFoundError:
        raise RecmixError(f"{uri}: not a prepared dataset (no {MANIFEST}; run a `kind: prepare` job first)") from None
    except OSError as e:
        raise RecmixError(f"{uri}: cannot read {MANIFEST}: {str(e).splitlines()[0]}") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise RecmixError(f"{uri}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RecmixError(f"{uri}: {MANIFEST} has format {got!r}, expected {FORMAT!r}")
    return PreparedDataset(uri, fs, root, manifest)

