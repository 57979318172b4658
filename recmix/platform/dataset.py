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
from recmix.platform.specs.data import Feature, FeatureSchema, FeatureType, StorageConfig, check_uri

FORMAT = "recmix-dataset-v1"
MANIFEST = "_manifest.json"
SPLITS = ("train", "valid", "test")
TIMESTAMP = "timestamp"
USER_KEY = "user_key"


def arrow_type(f: Feature) -> pa.DataType:
    """The column type a prepared dataset holds for a feature (table in specs/data.py)."""
    if f.type is FeatureType.dense:
        return pa.float32() if f.dim == 1 else pa.list_(pa.float32())
    if f.type is FeatureType.categorical:
        return pa.int64()
    return pa.list_(pa.int64())


def arrow_schema(schema: FeatureSchema) -> pa.Schema:
    """Column order: features as declared, then `timestamp` and `user_key`."""
    fields = [pa.field(f.name, arrow_type(f), nullable=False) for f in schema.features]
    return pa.schema(fields + [pa.field(TIMESTAMP, pa.int64(), nullable=False), pa.field(USER_KEY, pa.int64(), nullable=False)])


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_list(want):  # list field names ("item" / "element") differ between writers
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and got.value_type == want.value_type
    return got == want


def _describe(t: pa.DataType) -> str:
    return str(t).replace("element: ", "").replace("item: ", "")


def column_problems(actual: pa.Schema, schema: FeatureSchema, columns: Optional[Sequence[str]] = None) -> list[str]:
    """Columns of `actual` (a file's or a table's schema) that differ from what the manifest's feature schema
    declares: missing, or of another type. Nothing is cast: a float user_id is a problem, not an int."""
    expected = arrow_schema(schema)
    names = list(columns) if columns is not None else expected.names
    problems = []
    for name in names:
        want = expected.field(name).type
        idx = actual.get_field_index(name)
        if idx < 0:
            problems.append(f"column '{name}' is missing")
        elif not _same_type(actual.field(idx).type, want):
            problems.append(f"column '{name}' is {_describe(actual.field(idx).type)}, the manifest declares {_describe(want)}")
    return problems


def check_columns(actual: pa.Schema, schema: FeatureSchema, where: str, columns: Optional[Sequence[str]] = None) -> None:
    """RecmixError (one line) when `actual` does not hold the declared column types; for readers that do not
    go through `read_split` (Ray Data: `check_columns(ds.schema().base_schema, prepared.schema, uri)`)."""
    problems = column_problems(actual, schema, columns)
    if problems:
        raise RecmixError(f"{where}: does not match its manifest: {'; '.join(problems)}")


def check_nulls(table: pa.Table, where: str) -> None:
    nulls = [f"'{name}' ({table.column(name).null_count})" for name in table.column_names if table.column(name).null_count]
    if nulls:
        raise RecmixError(f"{where}: null values in columns {', '.join(nulls)} (prepared datasets have none)")


class PreparedDataset:
    def __init__(self, uri: str, filesystem: pafs.FileSystem, root: str, manifest: dict):
        self.uri = uri
        self.filesystem = filesystem
        self.root = root
        self.manifest = manifest
        self.schema = FeatureSchema.model_validate(manifest["features"])
        for split in manifest["splits"].values():
            if not all(isinstance(f, str) and f.endswith(".parquet") and ".." not in f.split("/") and not f.startswith("/")
                       for f in split["files"]):
                raise ValueError(f"split files must be relative .parquet paths inside the dataset, got {split['files']!r}"[:300])

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise RecmixError(f"{self.uri}: unknown split '{split}' (known: {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def check_split(self, split: str) -> None:
        """Every file of a split holds the declared column types (footers only: no data is read)."""
        for p in self.split_files(split):
            try:
                actual = pq.read_schema(p, filesystem=self.filesystem)
            except (OSError, pa.ArrowInvalid) as e:
                why = _storage.describe(e) if isinstance(e, OSError) else str(e).splitlines()[0]
                raise RecmixError(f"{self.uri}: cannot read {p}: {why}") from None
            check_columns(actual, self.schema, f"{self.uri}: {p}")

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
        tables = []
        for p in files:
            try:
                t = pq.read_table(p, columns=list(columns) if columns is not None else None, filesystem=self.filesystem)
            except (OSError, pa.ArrowInvalid) as e:
                why = _storage.describe(e) if isinstance(e, OSError) else str(e).splitlines()[0]
                raise RecmixError(f"{self.uri}: cannot read split '{split}' of version {self.version}: {why}") from None
            check_columns(t.schema, self.schema, f"{self.uri}: {p}", columns)
            check_nulls(t, f"{self.uri}: {p}")
            tables.append(t)
        if not tables:  # the writer puts at least one (possibly empty) file in every split
            raise RecmixError(f"{self.uri}: split '{split}' of version {self.version} lists no files")
        return pa.concat_tables(tables, promote_options="permissive")

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
        raise RecmixError(f"{uri}: cannot read {MANIFEST}: {_storage.describe(e, storage)}") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise RecmixError(f"{uri}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RecmixError(f"{uri}: {MANIFEST} has format {got!r}, expected {FORMAT!r}")
    try:
        return PreparedDataset(uri, fs, root, manifest)
    except (KeyError, TypeError, ValueError) as e:  # pydantic errors are ValueErrors
        what = f"no '{e.args[0]}'" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
        raise RecmixError(f"{uri}: {MANIFEST} is malformed: {what}") from None

