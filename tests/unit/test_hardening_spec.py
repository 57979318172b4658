"""Hostile spec files: each one exits 2 with one line, quickly (issue 14, item 4)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from recmix.jobs.cli import main
from recmix.platform.specs import load
from recmix.platform.specs.prepare import MovieLensSource, PrepareSpec


def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "kind: prepare\n" + "\n".join(lines) + "\n"


def _merge_bomb(levels: int) -> str:
    lines = ['m0: &m0 {k0: "x"}']
    for i in range(1, levels + 1):
        lines.append(f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + f"], k{i}: y}}")
    return "kind: prepare\n" + "\n".join(lines) + "\n"


ML = "kind: prepare\nsource: {type: movielens100k, path: /data}\noutput: {uri: /tmp/out}\n"

CASES = [
    ("alias-bomb", _bomb(9).encode(), ".yaml", "expands to more than 100,000 values"),
    ("merge-bomb", _merge_bomb(9).encode(), ".yaml", "expands to more than 100,000 values"),
    ("recursive-alias", b"kind: prepare\nx: &x [1, *x]\n", ".yaml", "recursive YAML alias"),
    ("nesting-yaml-flow", b"[" * 100_000 + b"]" * 100_000, ".yaml", "nesting depth"),
    ("nesting-yaml-block", b"- " * 100_000 + b"x\n", ".yaml", "nesting depth"),
    ("nesting-yaml-moderate", b"kind: prepare\nx: " + b"{a: " * 500 + b"1" + b"}" * 500, ".yaml", "deeper than 64 levels"),
    ("nesting-json", b"[" * 100_000 + b"]" * 100_000, ".json", "nested too deeply"),
    ("nesting-json-object", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, ".json", "nested too deeply"),
    ("binary-garbage", bytes(range(256)) * 16, ".yaml", "not UTF-8 text"),
    ("control-characters", bytes(range(1, 32)) * 8, ".yaml", "not valid YAML"),
    ("png-header", b"\x89PNG\r\n\x1a\n" + bytes(200), ".yaml", "not UTF-8 text"),
    ("latin-1", "kind: prepare\nname: caf\xe9\n".encode("latin-1"), ".yaml", "not UTF-8 text (byte 23"),
    ("latin-1-json", '{"kind": "caf\xe9"}'.encode("latin-1"), ".json", "not UTF-8 text"),
    ("duplicate-key", ML.encode() + b"source: {type: synthetic, n_rows: 5}\n", ".yaml", "duplicate key 'source' (first at line 2)"),
    ("duplicate-nested-key", b"kind: prepare\noutput: {uri: /a, uri: /b}\n", ".yaml", "duplicate key 'uri'"),
    ("duplicate-key-json", b'{"kind": "prepare", "kind": "train"}', ".json", "duplicate key 'kind'"),
    ("too-big", b"kind: prepare\n#" + b"x" * (2 << 20) + b"\n", ".yaml", "a spec file may have at most 1,048,576"),
    ("nul-in-path", b'kind: prepare\nsource: {type: movielens100k, path: "/data\\0/x"}\noutput: {uri: /tmp/o}\n', ".yaml",
     "source.path: contains a NUL character"),
    ("nul-in-uri-json", b'{"kind": "prepare", "source": {"type": "movielens100k", "path": "/d"}, "output": {"uri": "/tmp/\\u0000x"}}',
     ".json", "output.uri: contains a NUL character"),
]


@pytest.mark.parametrize("name,content,suffix,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_spec_exits_2_with_one_line(tmp_path, capsys, name, content, suffix, expected):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(content)
    t0 = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recmix: error: ") and expected in err, err


def test_alias_bomb_in_a_fresh_process_exits_2_within_5_s(tmp_path):
    """The whole CLI, as a user runs it: before the fix 9 levels of aliases hung the `${VAR}` walk."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recmix.jobs.cli", "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 5 + 3  # + interpreter and import start-up on a loaded 2-core machine
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_c_loader_used_where_installed():
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML built without libyaml")
    assert issubclass(load._SpecLoader, yaml.CSafeLoader)


def test_aliases_within_the_bounds_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("kind: prepare\nsource: &src {type: movielens100k, path: /data}\noutput: {uri: /tmp/out}\n"
                    "x-anchors: [*src, *src]\n")
    data = load.read_spec_file(path)
    assert data["x-anchors"] == [data["source"]] * 2


def test_merge_key_override_is_not_a_duplicate(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nkind: prepare\nx: {<<: *b, b: 3}\n")
    assert load.read_spec_file(path)["x"] == {"a": 1, "b": 3}


@pytest.mark.parametrize("field", ["path", "uri"])
def test_nul_and_control_characters_refused_at_validation(field):
    """Specs built in code (not from a file) are checked by the models themselves."""
    src = {"type": "movielens100k", "path": "/data"}
    out = {"uri": "/tmp/out"}
    (src if field == "path" else out)[field] = "/tmp/a\x00b"
    with pytest.raises(ValueError, match="control character"):
        PrepareSpec.model_validate({"kind": "prepare", "source": src, "output": out})
    with pytest.raises(ValueError, match="control character"):
        MovieLensSource.model_validate({"type": "movielens100k", "path": "/x\ny"})
