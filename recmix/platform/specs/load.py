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


def _interpolate(obj: Any, where: str = "") -> Any:
    """`${VAR}` / `${VAR:-default}` in string values; an unset variable without default is an error."""
    if isinstance(obj, str):
        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1), m.group(2))
            if val is None:
                raise RecmixError(f"{where or '<root>'}: environment variable '{m.group(1)}' is not set "
                                  f"(used as ${{{m.group(1)}}}; export it or write ${{{m.group(1)}:-default}})")
            return val
        return _ENV.sub(sub, obj)
    if isinstance(obj, list):
        return [_interpolate(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    return obj


def read_spec_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RecmixError(f"spec file not found: {p}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise RecmixError(f"{p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecmixError(f"{p}: not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise RecmixError(f"{p}: a job spec must be a mapping with a 'kind', got {type(data).__name__}")
    try:
        return _interpolate(data)
    except RecmixError as e:
        raise RecmixError(f"{p}: {e}") from None


def format_errors(err: ValidationError, data: Any = None) -> list[str]:
    """One line per error: `path.to.field: reason (got: value)`.

    pydantic puts tagged-union branch names (the `kind` / `type` value) into error locations; they are
    dropped by walking `data` along the location, so a real field that happens to be called `train` stays.
    """
    lines = []
    for e in err.errors(include_url=False):
        parts = _user_path(e["loc"], data)
        ctx = e.get("ctx") or {}
        kind = e["type"]
        got = e.get("input")
        if kind == "union_tag_invalid":
            disc = str(ctx.get("discriminator", "")).strip("'")
            parts.append(disc)
            msg = f"unknown {disc} '{ctx.get('tag')}' (expected one of: {ctx.get('expected_tags')})"
            got = None
        elif kind == "union_tag_not_found":
            parts.append(str(ctx.get("discriminator", "")).strip("'"))
            msg, got = "required field missing", None
        elif kind == "extra_forbidden":
            msg = f"unknown key '{parts[-1] if parts else '?'}'"
        elif kind == "missing":
            msg, got = "required field missing", None
        else:
            msg = e["msg"].removeprefix("Value error, ")
        path = ".".join(parts) or "<root>"
        if got is None or isinstance(got, (dict, list)):
            lines.append(f"{path}: {msg}")
            continue
        shown = json.dumps(got, default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{path}: {msg} (got: {shown})")
    return lines


def _user_path(loc: tuple, data: Any) -> list[str]:
    out: list[str] = []
    cur = data
    for x in loc:
        if isinstance(x, str) and (x.startswith("function-") or x.startswith("tagged-union[")):
            continue
        if isinstance(cur, dict) and x not in cur and x in (cur.get("kind"), cur.get("type")):
            continue  # a union branch, named by the tag value of the mapping we are in
        out.append(str(x))
        if isinstance(cur, dict):
            cur = cur.get(x)
        elif isinstance(cur, list) and isinstance(x, int) and 0 <= x < len(cur):
            cur = cur[x]
        else:
            cur = None
    return out


def parse_spec(data: dict, source: str = "<spec>"):
    try:
        return JOB_ADAPTER.validate_python(data)
    except ValidationError as e:
        raise SpecError(source, format_errors(e, data)) from None


def load_spec(path: str | os.PathLike):
    return parse_spec(read_spec_file(path), str(path))


class SpecError(RecmixError):
    def __init__(self, source: str, lines: list[str]):
        self.lines = lines
        super().__init__(f"{source}: invalid job spec ({len(lines)} error{'s' if len(lines) != 1 else ''})\n" + "\n".join("  " + l for l in lines))
