"""Any parquet dataset (a file or a folder of files) -> a prepared dataset.

The declared feature columns are checked against the parquet schema first (every missing column, wrong
type and list/scalar mix-up is reported together, before any data is read), then against the values
(nulls, ids out of range, lists longer than max_len). Rows are sorted by (timestamp, user key) and split
by position like MovieLens. [choice] The source is read into memory whole: the sort is global.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import FeatureSchema, StorageConfig
from recmix.platform.specs.prepare import ParquetSource

from .columns import TIMESTAMP, USER_KEY, check_types, conform, fail


def _open(src: ParquetSource, store: StorageConfig) -> pads.Dataset:
    fs, path = storage.resolve(src.uri, store)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise RecmixError(f"parquet source {src.uri}: cannot read: {str(e).splitlines()[0]}") from None
    if info.type is pafs.FileType.NotFound:
        raise RecmixError(f"parquet source {src.uri}: not found")
    try:
        return pads.dataset(path, filesystem=fs, format="parquet")
    except (OSError, pa.ArrowInvalid) as e:
        raise RecmixError(f"parquet source {src.uri}: not readable as parquet: {str(e).splitlines()[0]}") from None


def _key_problems(name: str, role: str, types: dict, allow_timestamp: bool) -> list[str]:
    if name not in types:
        return [f"{role} column '{name}' is missing (columns: {', '.join(sorted(types))})"]
    t = types[name]
    if pa.types.is_integer(t) or (allow_timestamp and pa.types.is_timestamp(t)):
        return []
    return [f"{role} column '{name}' is {t} but must be an integer{' or a timestamp' if allow_timestamp else ''}"]


def read(src: ParquetSource, schema: FeatureSchema, store: StorageConfig) -> pa.Table:
    """Validated, cast and time-sorted table in the prepared layout (features, timestamp, user_key)."""
    where = f"parquet source {src.uri}"
    ds = _open(src, store)
    types = {f.name: f.type for f in ds.schema}
    problems = check_types(types, schema)
    problems += _key_problems(src.timestamp_column, "timestamp_column", types, allow_timestamp=True)
    problems += _key_problems(src.user_key_column, "user_key_column", types, allow_timestamp=False)
    fail(where, problems)

    wanted = list(dict.fromkeys([f.name for f in schema.features] + [src.timestamp_column, src.user_key_column]))
    try:
        raw = ds.to_table(columns=wanted)
    except (OSError, pa.ArrowInvalid) as e:
        raise RecmixError(f"{where}: cannot read: {str(e).splitlines()[0]}") from None
    ts = raw.column(src.timestamp_column)
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(pc.cast(ts, pa.timestamp("s")), pa.int64())
    for key, col in ((src.timestamp_column, ts), (src.user_key_column, raw.column(src.user_key_column))):
        if col.null_count:
            fail(where, [f"column '{key}' has {col.null_count} null values"])
    table = pa.table({**{f.name: raw.column(f.name) for f in schema.features},
                      TIMESTAMP: pc.cast(ts, pa.int64()), USER_KEY: pc.cast(raw.column(src.user_key_column), pa.int64())})
    table = conform(table, schema, where)
    if table.num_rows == 0:
        raise RecmixError(f"{where}: no rows")
    order = pc.sort_indices(table, sort_keys=[(TIMESTAMP, "ascending"), (USER_KEY, "ascending")])
    return table.take(order)
