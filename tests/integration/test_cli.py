"""The `recmix` CLI end to end: run, validate, schema, bench flags, --version, joining a cluster, exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from recmix.jobs.cli import main
from recmix.platform.dataset import open_dataset
from recmix.platform.specs.data import StorageConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture
def env(monkeypatch, tmp_path, ml100k_dir):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RECMIX_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("RECMIX_ML100K", str(ml100k_dir))
    return tmp_path / "artifacts"


def test_run_ml100k_example(env, capsys):
    assert main(["run", "examples/prepare-ml100k.yaml", "--json"]) == 0
    out = capsys.readouterr().out
    assert "train       80,000 rows  label rate 0.5509" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rows"] == 100_000 and summary["splits"]["valid"]["rows"] == 10_000
    ds = open_dataset(str(env / "ml100k"))
    assert ds.version == summary["version"] and ds.read_split("test").num_rows == 10_000


def test_examples_read_ml100k_from_RECMIX_ML100K_only(monkeypatch, tmp_path, capsys):
    """The examples take the data folder from ${RECMIX_ML100K} (no default); unset or wrong, the error names it."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RECMIX_ARTIFACTS", str(tmp_path / "artifacts"))
    for ex in EXAMPLES:
        assert "../shared" not in ex.read_text(), ex.name
    path = yaml.safe_load((REPO / "examples/prepare-ml100k.yaml").read_text())["source"]["path"]
    assert path == "${RECMIX_ML100K}"
    monkeypatch.delenv("RECMIX_ML100K", raising=False)
    assert main(["run", "examples/prepare-ml100k.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RECMIX_ML100K" in err, err
    monkeypatch.setenv("RECMIX_ML100K", str(tmp_path / "empty"))
    assert main(["run", "examples/prepare-ml100k.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RECMIX_ML100K" in err and "u.data" in err, err


def test_run_ml100k_to_s3(env, tmp_path, s3_server, s3_bucket, capsys):
    import pyarrow.fs as pafs

    bucket = s3_bucket
    spec = yaml.safe_load((REPO / "examples/prepare-ml100k.yaml").read_text())
    spec["output"]["uri"] = f"s3://{bucket}/datasets/ml100k"
    spec["storage"] = {"endpoint_url": s3_server}
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0
    first = open_dataset(spec["output"]["uri"], StorageConfig(endpoint_url=s3_server))
    assert main(["run", str(path)]) == 0  # re-run replaces the version; the old folder goes
    ds = open_dataset(spec["output"]["uri"], StorageConfig(endpoint_url=s3_server))
    assert ds.version != first.version
    train = ds.read_split("train", columns=["label", "timestamp"])
    assert train.num_rows == 80_000 and abs(pc.mean(train["label"]).as_py() - 0.5509) < 5e-5
    listing = ds.filesystem.get_file_info(pafs.FileSelector(f"{bucket}/datasets/ml100k"))
    assert sorted(i.base_name for i in listing) == ["_manifest.json", ds.version]


def test_corrupted_input_fails_checksum_exit_2(env, tmp_path, ml100k_dir, capsys):
    copy = tmp_path / "ml"
    shutil.copytree(ml100k_dir, copy)
    data = bytearray((copy / "u.item").read_bytes())
    data[len(data) // 2] ^= 0x20
    (copy / "u.item").write_bytes(bytes(data))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"kind: prepare\nsource: {{type: movielens100k, path: '{copy}'}}\noutput: {{uri: '{tmp_path / 'out'}'}}\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recmix: error: checksum mismatch for ") and "u.item" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["prepare", None])
def test_schema_is_json_schema(capsys, kind):
    assert main(["schema"] + ([kind] if kind else [])) == 0
    schema = json.loads(capsys.readouterr().out)
    if kind:
        assert "properties" in schema and {"source", "output", "features", "splits", "storage"} <= set(schema["properties"])
        assert "synthetic" in json.dumps(schema)
    else:
        assert "discriminator" in json.dumps(schema) or "oneOf" in schema


def test_schema_unknown_kind(capsys):
    assert main(["schema", "nosuch"]) == 2
    assert "unknown job kind 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_validate_examples(example, capsys, ml100k_dir):  # ml100k_dir exports RECMIX_ML100K, which examples interpolate
    assert main(["validate", str(example)]) == 0
    assert "valid" in capsys.readouterr().out


def test_examples_present():
    names = {p.name for p in EXAMPLES}
    assert {"prepare-ml100k.yaml", "prepare-synthetic.yaml", "pipeline-ml100k.yaml"} <= names


# examples/pipeline-ml100k.yaml end to end: tests/integration/test_serve_pipeline.py


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"recmix {version('recmix')}"


def test_bench_help_lists_every_bench_with_a_description(capsys):
    from recmix.jobs.bench import BENCHES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for name, b in BENCHES.items():
        assert any(line.split()[:1] == [name] and b.description in line for line in out.splitlines()), name


@pytest.mark.parametrize("argv,expected", [
    (["bench", "quality", "--set", "colour=red"], "--set colour: unknown parameter of bench 'quality' (known: batch_size, dataset, epochs, holdout, lr, ml100k, models, patience, schedule, seeds, weight_decay, workers)"),
    (["bench", "w8a16", "--set", "seeds=1"], "--set seeds: unknown parameter of bench 'w8a16' (known: none)"),
    (["bench", "quality", "--set", "seeds"], "--set 'seeds': expected key=value"),
    (["bench", "quality", "--set", "workers=0"], "params.workers: Input should be greater than or equal to 1"),
    (["bench", "nosuch"], "name: unknown benchmark 'nosuch'"),
])
def test_bench_flags_are_strict(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_quality_bench_without_a_dataset_names_the_parameter_and_variable(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RECMIX_ML100K", raising=False)
    assert main(["bench", "quality", "--quick", "--set", f"dataset={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params.dataset" in err and "params.ml100k" in err and "RECMIX_ML100K" in err


def _kill_cluster(temp_dir: str) -> None:
    """SIGKILL the processes of the `ray start` cluster that uses `temp_dir` (its gcs_server ignores SIGTERM)."""
    import signal

    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if temp_dir in (d / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_join_token_cluster(tmp_path):
    """Joining a token-authenticated cluster: with its token it works; without, one error line and exit 2 (~35 s)."""
    import secrets
    import subprocess
    import sys
    import tempfile

    from recmix.platform.cluster import free_port

    bin_dir = Path(sys.executable).parent
    port, token = free_port(), secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="rmxauth", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    try:
        subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=1",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, check=True, capture_output=True, timeout=120)
        address = f"127.0.0.1:{port}"
        join = ("from recmix.platform import cluster\nfrom recmix.platform.specs.cluster import ClusterConfig\n"
                f"with cluster.cluster(ClusterConfig(address='{address}')):\n    pass\n")
        ok = subprocess.run([sys.executable, "-c", join], env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert f"[ray] joined the cluster at {address}; no dashboard (the cluster runs without one)" in ok.stdout

        spec = tmp_path / "p.yaml"
        spec.write_text("kind: pipeline\nstages:\n  - {name: a, spec: {kind: bench, name: w8a16, quick: true}}\n")
        bad = subprocess.run([str(bin_dir / "recmix"), "run", str(spec), "--address", address], env={**env, "RAY_AUTH_MODE": "disabled"},
                             capture_output=True, text=True, timeout=180)
        assert bad.returncode == 2
        errors = [line for line in bad.stderr.splitlines() if line.startswith("recmix: error:")]
        assert len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert f"cannot join the Ray cluster at {address}" in errors[0] and "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in errors[0]
        assert "W8A16 per-token matmul" not in bad.stdout  # the stage never ran
    finally:
        _kill_cluster(temp_dir)
