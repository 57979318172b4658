"""Check a table against a feature schema and cast it to the prepared-dataset column types.

Every mismatch (missing column, wrong type, list vs scalar, null, id out of range, list too long) is
collected and reported together in one RecmixError, so a user fixes a spec in one round.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from recmix.platform.dataset import TIMESTAMP, USER_KEY, arrow_schema, arrow_type  # noqa: F401  (re-exported)
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import Feature, FeatureRole, FeatureSchema, FeatureType


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _describe(t: pa.DataType) -> str:
    return str(t).replace("element: ", "").replace("item: ", "")


def check_types(columns: dict[str, pa.DataType], schema: FeatureSchema) -> list[str]:
    """Problems with declared features vs column types (no data needed: works on a parquet schema)."""
    problems = []
    for f in schema.features:
        if f.name not in columns:
            problems.append(f"column '{f.name}' ({f.type.value}) is missing (columns: {', '.join(sorted(columns))})")
            continue
        t = columns[f.name]
        want = _expected(f)
        if f.type is FeatureType.categorical:
            ok = pa.types.is_integer(t)
        elif f.type is FeatureType.dense and f.dim == 1:
            ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        elif f.type is FeatureType.dense:
            ok = _is_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))
        else:
            ok = _is_list(t) and pa.types.is_integer(t.value_type)
        if not ok:
            kind = "a list" if _is_list(t) else "a scalar"
            problems.append(f"column '{f.name}' is {_describe(t)} ({kind}) but {f.type.value} feature needs {want}")
    return problems


def _expected(f: Feature) -> str:
    if f.type is FeatureType.categorical:
        return "an integer scalar"
    if f.type is FeatureType.dense:
        return "a number" if f.dim == 1 else f"a list of {f.dim} numbers"
    return "a list of integers"


def _check_ids(name: str, f: Feature, values: pa.Array) -> list[str]:
    if len(values) == 0:
        return []
    mm = pc.min_max(values)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo is None:
        return []
    if lo < 0:
        return [f"column '{name}' has negative id {lo} (ids must be >= 0)"]
    if f.vocab_size is not None and hi >= f.vocab_size:
        return [f"column '{name}' has id {hi} >= vocab_size {f.vocab_size}"]
    return []


def check_values(table: pa.Table, schema: FeatureSchema) -> list[str]:
    problems = []
    for f in schema.features:
        col = table.column(f.name)
        if col.null_count:
            problems.append(f"column '{f.name}' has {col.null_count} null values")
            continue
        if f.type is FeatureType.categorical:
            problems += _check_ids(f.name, f, col)
        elif f.type in (FeatureType.sequence, FeatureType.multi_categorical):
            lengths = pc.list_value_length(col)
            longest = pc.max(lengths).as_py() or 0
            if longest > f.max_len:
                problems.append(f"column '{f.name}' has a list of length {longest} > max_len {f.max_len}")
            flat = pc.list_flatten(col)
            if flat.null_count:
                problems.append(f"column '{f.name}' has {flat.null_count} null list elements")
            else:
                problems += _check_ids(f.name, f, flat)
        elif f.type is FeatureType.dense and f.dim > 1:
            bad = pc.sum(pc.not_equal(pc.list_value_length(col), f.dim)).as_py()
            if bad:
                problems.append(f"column '{f.name}' has {bad} lists whose length is not dim {f.dim}")
        if f.role is FeatureRole.label:
            vals = pc.cast(col, pa.float64())
            off = pc.sum(pc.and_(pc.not_equal(vals, 0.0), pc.not_equal(vals, 1.0))).as_py()
            if off:
                problems.append(f"label column '{f.name}' has {off} values other than 0 and 1")
    return problems


def fail(where: str, problems: list[str]) -> None:
    if problems:
        n = len(problems)
        raise RecmixError(f"{where}: {n} column problem{'s' if n != 1 else ''}\n" + "\n".join("  " + p for p in problems))


def conform(table: pa.Table, schema: FeatureSchema, where: str) -> pa.Table:
    """Validate `table` (features + timestamp + user_key) against `schema` and cast to the output layout."""
    cols = {name: table.schema.field(name).type for name in table.column_names}
    problems = check_types(cols, schema)
    for extra in (TIMESTAMP, USER_KEY):
        if extra not in cols or not pa.types.is_integer(cols[extra]):
            problems.append(f"column '{extra}' must be an integer column (got {_describe(cols[extra]) if extra in cols else 'nothing'})")
    fail(where, problems)
    fail(where, check_values(table, schema))
    target = arrow_schema(schema)
    arrays = [pc.cast(table.column(fld.name), fld.type) for fld in target]
    return pa.Table.from_arrays(arrays, schema=target)
