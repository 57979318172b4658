"""The metric registry, docs/operations.md and the Grafana board agree; components declare registered names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recmix.platform import metrics

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "operations.md").read_text()
BOARD = REPO / "deploy" / "grafana" / "recmix-dashboard.json"


def _doc_table() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `(recmix_[a-z0-9_]+)` \|\s*(\w+)\s*\|([^|]*)\|", DOC, flags=re.M)
    return {name: (kind, tags.strip()) for name, kind, tags in rows}


def test_every_registered_metric_is_documented_with_its_type_and_tags():
    table = _doc_table()
    assert set(table) == set(metrics.BY_NAME), set(table) ^ set(metrics.BY_NAME)
    for m in metrics.METRICS:
        assert table[m.name] == (m.kind, ", ".join(m.tags)), m.name


def _exprs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)] + \
               [e for k, v in node.items() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_grafana_board_refers_only_to_documented_metrics():
    board = json.loads(BOARD.read_text())
    exprs = _exprs(board)
    assert len(exprs) >= 15
    used = {n for e in exprs for n in re.findall(r"\bray_[a-z0-9_]+", e)}
    recmix_used = {n for n in used if n.startswith("ray_recmix_")}
    assert recmix_used <= metrics.all_exported(), recmix_used - metrics.all_exported()
    for name in used - recmix_used:  # Ray's own metrics: named in the docs
        assert f"`{name}`" in DOC, name
    components = {m.component for m in metrics.METRICS}
    shown = {m.component for m in metrics.METRICS if set(metrics.exported(m)) & used}
    assert shown == components, components - shown


def test_exported_names_follow_ray():
    by = metrics.BY_NAME
    assert metrics.exported(by["recmix_ps_evictions"]) == ["ray_recmix_ps_evictions_total"]
    assert metrics.exported(by["recmix_ps_rows"]) == ["ray_recmix_ps_rows"]
    assert "ray_recmix_serve_latency_s_bucket" in metrics.exported(by["recmix_serve_latency_s"])


# serve is helper-owned and still moving: its names are checked by the scrape test instead
DECLARED = re.compile(r"""(?:Counter|Gauge|Histogram|make)\(\s*["'](recmix_[a-z0-9_]+)["']""")


def test_components_declare_only_registered_metrics():
    unregistered = {}
    for path in (REPO / "recmix").rglob("*.py"):
        if "serve" in path.parts:
            continue
        text = path.read_text()
        names = set(DECLARED.findall(text))
        if path.parts[-2:] == ("actors", "metrics.py"):  # its names sit in a table
            names |= set(re.findall(r'"(recmix_[a-z0-9_]+)"', text))
        if names - set(metrics.BY_NAME):
            unregistered[str(path.relative_to(REPO))] = names - set(metrics.BY_NAME)
    assert not unregistered, f"register them in recmix/platform/metrics.py and docs/operations.md: {unregistered}"


def test_make_refuses_undocumented_tags():
    with pytest.raises(AssertionError, match="documented tags"):
        metrics.make("recmix_prepare_rows", colour="red")
