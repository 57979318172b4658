"""Read a job spec file (YAML or JSON) and validate it; errors name the field path, reason and value."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recmix.platform.errors import RecmixError

from .job import JOB_ADAPTER

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(obj: Any) -> Any:
    """`${VAR}` / `${VAR:-default}` in string values; an unset variable without default is an error."""
    if isinstance(obj, str):
        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1), m.group(2))
            if val is None:
                raise RecmixError(f"environment variable '{m.group(1)}' is not set (used as ${{{m.group(1)}}})")
            return val
        return _ENV.sub(sub, obj)
    if isinstance(obj, list):
        return [_interpolate(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _interpolate(v) for k, v in obj.items()}
    return obj


def read_spec_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RecmixError(f"spec file not found: {p}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise RecmixError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecmixError(f"{p}: a job spec must be a mapping with a 'kind', got {type(data).__name__}")
    return _interpolate(data)


def format_errors(err: ValidationError) -> list[str]:
    """One line per error: `path.to.field: reason (got: value)`. Union branches are dropped from paths."""
    lines = []
    for e in err.errors(include_url=False):
        loc = [str(x) for x in e["loc"]]
        # Drop pydantic's tagged-union branch names (the `kind`/`type` value) from the path.
        path = ".".join(x for x in loc if not _is_branch(x)) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = json.dumps(got, default=str) if not isinstance(got, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{path}: {msg} (got: {shown})")
    return lines


_BRANCHES = {"prepare", "train", "bench", "pipeline", "serve", "movielens100k", "synthetic", "parquet",
             "function-after", "function-before", "function-wrap"}


def _is_branch(x: str) -> bool:
    return x in _BRANCHES or x.startswith("function-") or x.startswith("tagged-union[")


def parse_spec(data: dict, source: str = "<spec>"):
    try:
        return JOB_ADAPTER.validate_python(data)
    except ValidationError as e:
        raise SpecError(source, format_errors(e)) from None


def load_spec(path: str | os.PathLike):
    return parse_spec(read_spec_file(path), str(path))


class SpecError(RecmixError):
    def __init__(self, source: str, lines: list[str]):
        self.lines = lines
        super().__init__(f"{source}: invalid job spec ({len(lines)} error{'s' if len(lines) != 1 else ''})\n" + "\n".join("  " + l for l in lines))
