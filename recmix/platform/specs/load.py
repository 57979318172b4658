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

# Spec files are small; anything bigger is a mistake or an attack on the loader.
MAX_SPEC_BYTES = 1 << 20
# Values after expanding YAML aliases (an alias bomb expands exponentially) and nesting depth.
MAX_VALUES = 100_000
MAX_DEPTH = 64

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where installed (it also caps nesting)


class _SpecLoader(_BaseLoader):
    """Safe YAML that refuses duplicate keys, recursive aliases and documents too big or deep once expanded."""

    def construct_document(self, node):
        _check_nodes(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_nodes(root) -> None:
    """Expanded size and depth of the node graph, computed on the shared graph (linear, no expansion)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        key = id(node)
        if ready:
            kids = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            height[key] = 1 + max((height[id(c)] for c in kids), default=0)
            active.discard(key)
            if size[key] > MAX_VALUES:
                raise RecmixError(f"the spec expands to more than {MAX_VALUES:,} values (YAML aliases?)")
            if height[key] > MAX_DEPTH:
                raise RecmixError(f"the spec nests deeper than {MAX_DEPTH} levels")
            continue
        if key in size:
            continue
        active.add(key)
        stack.append((node, True))
        for c in _children(node):
            if id(c) in active:
                mark = c.start_mark
                raise RecmixError(f"recursive YAML alias at line {mark.line + 1}, column {mark.column + 1}")
            if id(c) not in size:
                stack.append((c, False))


def _no_duplicate_keys(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise RecmixError(f"duplicate key '{k}'")
        out[k] = v
    return out


class _Walk:
    """Bounded copy of loaded data: `${VAR}` interpolation, NUL refused, value count and depth capped."""

    def __init__(self):
        self.values = 0

    def __call__(self, obj: Any, where: str = "", depth: int = 0) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise RecmixError(f"the spec has more than {MAX_VALUES:,} values")
        if depth > MAX_DEPTH:
            raise RecmixError(f"{where or '<root>'}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(obj, str):
            return self._string(obj, where)
        if isinstance(obj, list):
            return [self(v, f"{where}.{i}" if where else str(i), depth + 1) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            return {k: self(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in obj.items()}
        return obj

    @staticmethod
    def _string(text: str, where: str) -> str:
        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1), m.group(2))
            if val is None:
                raise RecmixError(f"{where or '<root>'}: environment variable '{m.group(1)}' is not set "
                                  f"(used as ${{{m.group(1)}}}; export it or write ${{{m.group(1)}:-default}})")
            return val
        out = _ENV.sub(sub, text)
        if "\x00" in out:
            raise RecmixError(f"{where or '<root>'}: contains a NUL character")
        return out


def _interpolate(obj: Any, where: str = "") -> Any:
    """`${VAR}` / `${VAR:-default}` in string values; an unset variable without default is an error."""
    return _Walk()(obj, where)


def _read_text(p: Path) -> str:
    size = p.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise RecmixError(f"{p}: {size:,} bytes; a spec file may have at most {MAX_SPEC_BYTES:,}")
    with open(p, "rb") as f:
        raw = f.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:  # grew since stat, or a special file
        raise RecmixError(f"{p}: more than {MAX_SPEC_BYTES:,} bytes; a spec file may have at most {MAX_SPEC_BYTES:,}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecmixError(f"{p}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def read_spec_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if "\x00" in str(path):
        raise RecmixError("spec file path contains a NUL character")
    if not p.is_file():
        raise RecmixError(f"spec file not found: {p}")
    text = _read_text(p)
    try:
        if p.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        else:
            data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a safe loader (SafeConstructor)
    except json.JSONDecodeError as e:
        raise RecmixError(f"{p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecmixError(f"{p}: not valid YAML{where}: {what}") from None
    except RecursionError:
        raise RecmixError(f"{p}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    except RecmixError as e:
        raise RecmixError(f"{p}: {e}") from None
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
