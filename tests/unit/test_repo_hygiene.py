"""What a new user reads must hold on their machine: the README's commands, no paths to files they lack."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["recmix", "docs", "examples", "deploy", "README.md", "pyproject.toml", "cluster.yaml"]


def _shipped_files():
    for name in SHIPPED:
        p = REPO / name
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from (f for f in p.rglob("*") if f.is_file() and f.suffix in {".py", ".md", ".yaml", ".yml", ".json", ".toml"})


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = [line for block in _bash_blocks(readme) for line in block.splitlines() if "pytest" in line]
    ci_last = (REPO / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_last in commands, f".ci/run's command is not the README's: {ci_last}"


def test_readme_installs_torch_from_the_cpu_index():
    """On a public index torch==X for Linux x86-64 is the CUDA build: every setup command says where to get the CPU one."""
    readme = (REPO / "README.md").read_text()
    setups = [line for block in _bash_blocks(readme) for line in block.splitlines() if "pip install" in line and "torch" in line]
    assert len(setups) >= 2
    for line in setups:
        assert "--index-url https://download.pytorch.org/whl/cpu" in line, line


def test_no_machine_or_shared_paths_in_what_ships():
    bad = re.compile(r"\.\./shared|/work/|/opt/wheels|/root/")
    hits = []
    for f in _shipped_files():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if bad.search(line):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_license_matches_readme_and_pyproject():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    assert "Apache-2.0" in (REPO / "README.md").read_text()
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
