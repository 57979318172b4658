"""The import graph of `recmix`, read with `ast` (nothing is imported): layers, cycles, module names in strings.

Documented order: recmix.jobs -> recmix.actors, recmix.models, recmix.kernels -> recmix.platform. Every
`import` counts, at module level or inside a function (a lazy import is still a dependency), absolute or relative.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

RECMIX = Path(__file__).resolve().parents[2] / "recmix"

LAYER = {"": 0, "platform": 0, "kernels": 1, "models": 1, "actors": 1, "jobs": 2}
# Edges between layer-1 siblings that the documented order allows; every other sibling edge is a violation.
ALLOWED_SIBLING_EDGES = {
    ("models", "kernels"): "model code calls the kernels' dispatch points (docs/kernels.md)",
}
# Single module edges allowed beyond that, each with its reason; keep this list short and explicit.
ALLOWED_MODULE_EDGES = {
    ("recmix.actors.lookup", "recmix.models.embedding"): "the PS-backed lookup implements models.embedding.EmbeddingLookup",
}
JOBS_NAME = re.compile(r"\brecmix[./]jobs\b")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package directory)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _existing(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(root: Path) -> set[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of a module of `root`'s package."""
    mods = modules(root)
    top = root.name
    edges = set()
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # `from pkg import name`: an edge to pkg.name when that is a module, else to pkg
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                if t == top or t.startswith(top + "."):
                    dst = _existing(t, mods)
                    if dst and dst != mod:
                        edges.add((mod, dst, node.lineno))
    return edges


def _subsystem(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(edges: set[tuple[str, str, int]]) -> list[str]:
    bad = []
    for src, dst, line in sorted(edges):
        a, b = _subsystem(src), _subsystem(dst)
        if a == b or (src, dst) in ALLOWED_MODULE_EDGES:
            continue
        la, lb = LAYER.get(a), LAYER.get(b)
        if la is None or lb is None:
            bad.append(f"{src}:{line} -> {dst}: subsystem not in the layer table {sorted(LAYER)}")
        elif lb > la or (lb == la and (a, b) not in ALLOWED_SIBLING_EDGES):
            bad.append(f"{src}:{line} -> {dst}: {a or 'recmix'} (layer {la}) must not import {b} (layer {lb})")
    return bad


def cycles(edges: set[tuple[str, str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def jobs_names_below_jobs(root: Path) -> list[str]:
    """Strings (not docstrings) naming a recmix.jobs module in modules below jobs: `importlib` / "module:function"
    registries would hide an upward dependency from the import graph."""
    bad = []
    for mod, path in modules(root).items():
        if _subsystem(mod) == "jobs":
            continue
        tree = ast.parse(path.read_text(), str(path))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and JOBS_NAME.search(node.value):
                bad.append(f"{mod}:{node.lineno}: {node.value!r}")
    return bad


# --- the checks on recmix ---------------------------------------------------------------------------------------


def test_the_graph_is_read():
    edges = import_edges(RECMIX)
    pairs = {(s, d) for s, d, _ in edges}
    # a module-level, a relative and a function-level import, each known to exist
    assert ("recmix.jobs.pipeline", "recmix.platform.cluster") in pairs
    assert ("recmix.jobs.prepare", "recmix.jobs.prepare.writer") in pairs
    assert ("recmix.jobs.registry", "recmix.jobs.train") in pairs
    assert len(edges) > 100


def test_layers_import_downward_only():
    assert layer_violations(import_edges(RECMIX)) == []


def test_no_import_cycle():
    assert cycles(import_edges(RECMIX)) == []


def test_no_module_below_jobs_names_a_jobs_module_in_a_string():
    assert jobs_names_below_jobs(RECMIX) == []


def test_allowed_exceptions_still_exist():
    """An exception whose edge is gone must be deleted from the list, not kept as a silent licence."""
    pairs = {(s, d) for s, d, _ in import_edges(RECMIX)}
    assert set(ALLOWED_MODULE_EDGES) <= pairs
    subsystems = {(_subsystem(s), _subsystem(d)) for s, d in pairs}
    assert set(ALLOWED_SIBLING_EDGES) <= subsystems


def test_bench_registry_and_spec_name_the_same_benches():
    from recmix.jobs.bench import BENCHES
    from recmix.platform.specs.bench import BENCH_PARAMS

    assert set(BENCHES) == set(BENCH_PARAMS)


def test_every_job_kind_has_a_runner():
    from recmix.jobs.registry import RUNNERS
    from recmix.platform.specs.job import KINDS

    assert set(RUNNERS) == set(KINDS)


# --- the checker can fail ---------------------------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "recmix"
    for rel, text in {"__init__.py": "", "platform/__init__.py": "", "jobs/__init__.py": "", "models/__init__.py": "",
                      "kernels/__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def test_checker_rejects_an_upward_import_inside_a_function(tmp_path):
    root = _package(tmp_path, {
        "platform/cli.py": """
            def main():
                from recmix.jobs.pipeline import run
                return run
        """,
        "jobs/pipeline.py": "from ..platform import cli\n\ndef run():\n    return cli\n",
        "kernels/k.py": "from recmix.models import m\n",
        "models/m.py": "from recmix.kernels import k\n",
    })
    edges = import_edges(root)
    bad = layer_violations(edges)
    assert any(v.startswith("recmix.platform.cli:3 -> recmix.jobs.pipeline: platform (layer 0) must not import jobs") for v in bad), bad
    assert any(v.startswith("recmix.kernels.k:1 -> recmix.models.m: kernels (layer 1) must not import models") for v in bad), bad
    assert not any(v.startswith("recmix.models.m") for v in bad), bad  # models -> kernels is allowed
    assert sorted(cycles(edges)) == [["recmix.jobs.pipeline", "recmix.platform.cli"], ["recmix.kernels.k", "recmix.models.m"]]


def test_checker_rejects_a_registry_of_module_strings(tmp_path):
    root = _package(tmp_path, {
        "platform/bench.py": '''
            """Docstrings may mention recmix.jobs.bench."""
            import importlib

            REGISTRY = {"w8a16": "recmix.jobs.bench.w8a16:run"}

            def resolve(name):
                return importlib.import_module(f"recmix.jobs.bench.{name}")
        ''',
    })
    bad = jobs_names_below_jobs(root)
    assert [b.split(":")[0] for b in bad] == ["recmix.platform.bench", "recmix.platform.bench"], bad
    assert "recmix.jobs.bench.w8a16:run" in bad[0] and "recmix.jobs.bench." in bad[1]
