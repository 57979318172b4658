"""Run-time failures are one line and exit 2 (issue 14, item 5): output location, S3 endpoint, dataset types, Ctrl-C."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recmix.jobs import cli
from recmix.jobs.cli import main
from recmix.platform import dataset, storage
from recmix.platform.dataset import open_dataset
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig

FAST = {"connect_timeout_s": 1, "request_timeout_s": 1, "max_attempts": 2}


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHARDENINGTEST000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hardening-test-secret-value")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def silent_endpoint():
    """Accepts TCP connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def closed_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


class _Deny(http.server.BaseHTTPRequestHandler):
    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key '
            b"Id you provided does not exist in our records.</Message></Error>")

    def _deny(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _deny

    def log_message(self, *args):
        pass


@pytest.fixture
def denying_endpoint():
    """An S3 endpoint that rejects every request's credentials (InvalidAccessKeyId, as AWS does)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


# ---- output location -------------------------------------------------------------------------------------------

def test_check_writable_local(tmp_path):
    storage.check_writable(str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecmixError, match="is not a folder"):
        storage.check_writable(str(tmp_path / "file"))
    with pytest.raises(RecmixError, match="is not writable"):
        storage.check_writable(str(tmp_path / "file" / "sub"))
    with pytest.raises(RecmixError, match="is not writable"):
        storage.check_writable("/proc/recmix-cannot-write-here")


def _ml_spec(tmp_path: Path, output: str, **storage_cfg) -> Path:
    spec = {"kind": "prepare", "source": {"type": "movielens100k", "path": str(tmp_path / "no-ml")},
            "output": {"uri": output}}
    if storage_cfg:
        spec["storage"] = storage_cfg
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recmix: error: "), err
    return err


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_unwritable_output_fails_before_any_work(tmp_path, capsys, monkeypatch, where):
    from recmix.jobs.prepare import movielens

    monkeypatch.setattr(movielens, "read_files", lambda *a: pytest.fail("work started before the output check"))
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "ds", "proc": Path("/proc/recmix-x")}[where]
    assert main(["run", str(_ml_spec(tmp_path, str(out)))]) == 2
    assert str(out) in _one_line(capsys)


# ---- S3 endpoint -----------------------------------------------------------------------------------------------

def test_s3_silent_endpoint_fails_within_the_documented_bound(aws_env, silent_endpoint):
    cfg = StorageConfig(endpoint_url=silent_endpoint, **FAST)
    t0 = time.perf_counter()
    with pytest.raises(RecmixError, match="did not answer") as e:
        storage.check_writable("s3://bucket/x", cfg)
    took = time.perf_counter() - t0
    assert took < cfg.worst_case_s, (took, cfg.worst_case_s)
    assert silent_endpoint in str(e.value) and "\n" not in str(e.value)
    assert StorageConfig().worst_case_s == 78  # the figure documented in docs/failure-modes.md


def test_s3_unreachable_endpoint(aws_env, closed_endpoint, tmp_path, capsys):
    assert main(["run", str(_ml_spec(tmp_path, "s3://bucket/ds", endpoint_url=closed_endpoint, **FAST))]) == 2
    err = _one_line(capsys)
    assert "cannot reach the S3 endpoint" in err and closed_endpoint in err


def test_model_artifact_on_an_unreachable_endpoint_is_one_line(aws_env, closed_endpoint):
    """`recmix serve` and `init_from` resolve an artifact's version first (models.artifact.resolve_version)."""
    from recmix.models.artifact import resolve_version

    with pytest.raises(RecmixError, match="cannot reach the S3 endpoint") as e:
        resolve_version("s3://bucket/model", StorageConfig(endpoint_url=closed_endpoint, **FAST))
    assert str(e.value).startswith("s3://bucket/model: ") and "\n" not in str(e.value)


def test_s3_bad_credentials(aws_env, denying_endpoint, tmp_path, capsys):
    assert main(["run", str(_ml_spec(tmp_path, "s3://bucket/ds", endpoint_url=denying_endpoint, **FAST))]) == 2
    err = _one_line(capsys)
    assert "rejected the credentials (InvalidAccessKeyId)" in err and "hardening-test-secret-value" not in err


def test_s3_timeout_through_the_cli(aws_env, silent_endpoint, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["run", str(_ml_spec(tmp_path, "s3://bucket/ds", endpoint_url=silent_endpoint, **FAST))]) == 2
    assert time.perf_counter() - t0 < StorageConfig(**FAST).worst_case_s
    assert "did not answer" in _one_line(capsys)


def test_open_dataset_on_silent_endpoint(aws_env, silent_endpoint):
    with pytest.raises(RecmixError, match="did not answer"):
        open_dataset("s3://bucket/ds", StorageConfig(endpoint_url=silent_endpoint, **FAST))


# ---- dataset column types against the manifest -----------------------------------------------------------------

@pytest.fixture
def prepared(tmp_path, ml100k_dir):
    """The MovieLens-100K prepared dataset (no Ray: the ml100k source runs in the driver)."""
    from recmix.jobs.prepare import run
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.prepare import PrepareSpec

    out = tmp_path / "ds"
    run(PrepareSpec.model_validate({"kind": "prepare", "source": {"type": "movielens100k", "path": str(ml100k_dir)},
                                    "output": {"uri": str(out)}}), ClusterConfig())
    return open_dataset(str(out))


def _tamper(ds, split: str, column: str, values) -> None:
    path = ds.split_files(split)[0]
    t = pq.read_table(path)
    i = t.column_names.index(column)
    pq.write_table(t.set_column(i, column, pa.array(values(t.num_rows))), path)


@pytest.mark.parametrize("column,values,says", [
    ("user_id", lambda n: np.full(n, 3.7), "column 'user_id' is double, the manifest declares int64"),
    ("label", lambda n: ["yes"] * n, "column 'label' is string, the manifest declares float"),
    ("hist_items", lambda n: [[1.5]] * n, "column 'hist_items' is list<double>, the manifest declares list<int64>"),
])
def test_column_types_checked_never_cast(prepared, column, values, says):
    _tamper(prepared, "valid", column, values)
    for read in (lambda: prepared.read_split("valid"), lambda: prepared.check_split("valid"),
                 lambda: prepared.read_split("valid", columns=[column])):
        with pytest.raises(RecmixError, match="does not match its manifest") as e:
            read()
        assert says in str(e.value) and "\n" not in str(e.value)
    prepared.check_split("train")  # untouched splits still read


def test_nulls_refused(prepared):
    path = prepared.split_files("test")[0]
    t = pq.read_table(path)
    i = t.column_names.index("item_id")
    pq.write_table(t.set_column(i, pa.field("item_id", pa.int64()), pa.array([None] * t.num_rows, pa.int64())), path)
    with pytest.raises(RecmixError, match="null values in columns 'item_id'"):
        prepared.read_split("test")


def test_check_columns_public_helper(prepared):
    good = dataset.arrow_schema(prepared.schema)
    dataset.check_columns(good, prepared.schema, "x")
    bad = good.set(good.get_field_index("user_id"), pa.field("user_id", pa.float64()))
    with pytest.raises(RecmixError, match="x: does not match its manifest: column 'user_id' is double"):
        dataset.check_columns(bad, prepared.schema, "x")


@pytest.mark.parametrize("files", [["../../etc/passwd.parquet"], ["/etc/x.parquet"], ["v/train/part.csv"], [3]])
def test_hostile_dataset_manifest(prepared, files):
    import json

    path = Path(prepared.root) / "_manifest.json"
    m = json.loads(path.read_text())
    m["splits"]["train"]["files"] = files
    path.write_text(json.dumps(m))
    with pytest.raises(RecmixError, match="is malformed"):
        open_dataset(prepared.uri)


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------

def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(fn=interrupted)
    for sub in parser._subparsers._group_actions[0].choices.values():
        sub.set_defaults(fn=interrupted)
    assert main(["validate", "x.yaml"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "recmix: interrupted (Ctrl-C)"


# ---- secrets in what recmix writes -----------------------------------------------------------------------------

def test_redact_replaces_secret_env_values_and_url_passwords(monkeypatch):
    from recmix.platform import secrets

    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567890")
    monkeypatch.setenv("SHORT_SECRET", "abc")       # too short to be a secret worth matching
    monkeypatch.setenv("DATA_DIR", "/data/public")  # not a secret name
    doc = {"a": "x/tok-1234567890/y", "b": ["http://user:pw-0987654321@host:9000/p"], "c": "abc /data/public", "d": 3}
    assert secrets.redact(doc) == {"a": "x/${MY_API_TOKEN}/y", "b": ["http://user:***@host:9000/p"],
                                   "c": "abc /data/public", "d": 3}


def test_prepare_manifest_and_summary_keep_the_var_text_of_secret_interpolations(tmp_path, ml100k_dir, monkeypatch, capsys):
    """A `${VAR}` holding a secret is written as `${VAR}`, never as its value (the manifest dumps the source)."""
    import json

    monkeypatch.setenv("ML100K_ACCESS_TOKEN", str(ml100k_dir))
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: prepare\nsource: {type: movielens100k, path: '${ML100K_ACCESS_TOKEN}'}\n"
                    f"output: {{uri: '{tmp_path / 'ds'}'}}\n")
    assert main(["run", str(spec), "--json"]) == 0
    manifest = (tmp_path / "ds" / "_manifest.json").read_text()
    assert json.loads(manifest)["source"]["path"] == "${ML100K_ACCESS_TOKEN}"
    assert str(ml100k_dir) not in manifest and str(ml100k_dir) not in capsys.readouterr().out
