"""Bad job specs through the real CLI entry point: exit 2, one `recmix: error:` line naming the field path."""

from __future__ import annotations

import textwrap

import pytest

from recmix.jobs.cli import main

OK_SOURCE = "source: {type: movielens100k, path: /data/ml-100k}\n"
OK_OUTPUT = "output: {uri: /tmp/recmix-out}\n"
ML = "kind: prepare\n" + OK_SOURCE + OK_OUTPUT


def features(*lines: str, groups: str = "[{name: u, side: user}, {name: c}]") -> str:
    feats = "\n".join("    - " + l for l in lines)
    return f"features:\n  groups: {groups}\n  features:\n{feats}\n"


CAT = "{name: a, role: user, type: categorical, vocab_size: 5, embedding_dim: 4, group: u}"
ITEM = "{name: b, role: item, type: categorical, vocab_size: 5, embedding_dim: 4, group: c}"
LABEL = "{name: y, role: label, type: dense}"

# (id, spec text, file suffix, expected substrings of stderr)
CASES = [
    ("unknown-top-key", ML + "bogus: 1\n", ".yaml", ["bogus: unknown key 'bogus'"]),
    ("unknown-nested-key", "kind: prepare\nsource: {type: movielens100k, path: x, colour: red}\n" + OK_OUTPUT, ".yaml",
     ["source.colour: unknown key 'colour'"]),
    ("unknown-key-in-feature", ML + features(CAT[:-1] + ", colour: 1}", ITEM, LABEL), ".yaml",
     ["features.features.0.colour: unknown key"]),
    ("wrong-type-string", "kind: prepare\nsource: {type: synthetic, n_rows: many}\n" + OK_OUTPUT, ".yaml",
     ["source.n_rows: Input should be a valid integer", '(got: "many")']),
    ("wrong-type-list", "kind: prepare\nsource: {type: movielens100k, path: x, history_len: [1]}\n" + OK_OUTPUT, ".yaml",
     ["source.history_len: Input should be a valid integer"]),
    ("negative-size", "kind: prepare\nsource: {type: synthetic, n_rows: -5}\n" + OK_OUTPUT, ".yaml",
     ["source.n_rows: Input should be greater than 0 (got: -5)"]),
    ("zero-chunk", "kind: prepare\nsource: {type: synthetic, n_rows: 10, chunk_rows: 0}\n" + OK_OUTPUT, ".yaml",
     ["source.chunk_rows: Input should be greater than 0"]),
    ("zero-embedding-dim", ML + features(CAT.replace("embedding_dim: 4", "embedding_dim: 0"), ITEM, LABEL), ".yaml",
     ["features.features.0.embedding_dim: Input should be greater than 0"]),
    ("zipf-zero", "kind: prepare\nsource: {type: synthetic, n_rows: 10, zipf_exponent: 0}\n" + OK_OUTPUT, ".yaml",
     ["source.zipf_exponent: Input should be greater than 0"]),
    ("missing-path", "kind: prepare\nsource: {type: movielens100k}\n" + OK_OUTPUT, ".yaml", ["source.path: required field missing"]),
    ("missing-output", "kind: prepare\n" + OK_SOURCE, ".yaml", ["output: required field missing"]),
    ("missing-kind", OK_SOURCE + OK_OUTPUT, ".yaml", ["kind: required field missing"]),
    ("missing-source-type", "kind: prepare\nsource: {path: x}\n" + OK_OUTPUT, ".yaml", ["source.type: required field missing"]),
    ("unknown-enum", "kind: prepare\nsource: {type: movielens100k, path: x, checksums: maybe}\n" + OK_OUTPUT, ".yaml",
     ["source.checksums: Input should be 'if_present', 'required' or 'off'", '"maybe"']),
    ("unknown-source-type", "kind: prepare\nsource: {type: csv, path: x}\n" + OK_OUTPUT, ".yaml",
     ["source.type: unknown type 'csv'", "'movielens100k', 'synthetic', 'parquet'"]),
    ("unknown-kind", "kind: trainz\n", ".yaml", ["kind: unknown kind 'trainz'", "'prepare'"]),
    ("unknown-feature-type", ML + features(CAT.replace("categorical", "categoric"), ITEM, LABEL), ".yaml",
     ["features.features.0.type: Input should be"]),
    ("bad-uri-scheme", "kind: prepare\n" + OK_SOURCE + "output: {uri: 'gs://bucket/x'}\n", ".yaml",
     ["output.uri: unsupported URI scheme 'gs://'"]),
    ("bad-s3-bucket", "kind: prepare\n" + OK_SOURCE + "output: {uri: 's3://Bad_Bucket/x'}\n", ".yaml",
     ["output.uri: invalid S3 bucket in 's3://Bad_Bucket/x'"]),
    ("bad-source-uri", "kind: prepare\nsource: {type: parquet, uri: 'hdfs://x/y'}\n" + OK_OUTPUT + features(CAT, ITEM, LABEL), ".yaml",
     ["source.uri: unsupported URI scheme 'hdfs://'"]),
    ("bad-endpoint", ML + "storage: {endpoint_url: 'ftp://host:21'}\n", ".yaml", ["storage.endpoint_url: String should match pattern"]),
    ("unknown-group", ML + features(CAT.replace("group: u", "group: zz"), ITEM, LABEL), ".yaml",
     ["features: feature 'a' references unknown token group 'zz'"]),
    ("duplicate-feature", ML + features(CAT, ITEM, ITEM, LABEL), ".yaml", ["features: duplicate feature name 'b'"]),
    ("duplicate-group", ML + features(CAT, ITEM, LABEL, groups="[{name: u, side: user}, {name: c}, {name: u}]"), ".yaml",
     ["features.groups: duplicate token group 'u'"]),
    ("item-feature-in-user-group", ML + features(CAT, ITEM.replace("group: c", "group: u"), LABEL, groups="[{name: u, side: user}]"),
     ".yaml", ["features: item feature 'b' cannot sit in user-side group 'u'"]),
    ("no-vocab-or-buckets", ML + features(CAT.replace("vocab_size: 5, ", ""), ITEM, LABEL), ".yaml",
     ["features.features.0: categorical feature 'a' needs exactly one of vocab_size or hash_buckets"]),
    ("label-with-group", ML + features(CAT, ITEM, LABEL[:-1] + ", group: c}"), ".yaml",
     ["features.features.2: label feature 'y' must not name a token group"]),
    ("no-label", ML + features(CAT, ITEM), ".yaml", ["features: the feature schema needs at least one feature with role 'label'"]),
    ("reserved-feature-name", ML + features(CAT.replace("name: a", "name: timestamp"), ITEM, LABEL), ".yaml",
     ["<root>: feature names ['timestamp'] are reserved"]),
    ("parquet-without-features", "kind: prepare\nsource: {type: parquet, uri: /data/x}\n" + OK_OUTPUT, ".yaml",
     ["a parquet source needs 'features'"]),
    ("split-sum", ML + "splits: {train: 0.8, valid: 0.3, test: 0.1}\n", ".yaml",
     ["splits: split fractions must sum to 1, got 0.8 + 0.3 + 0.1 = 1.2"]),
    ("split-range", ML + "splits: {train: 1.5, valid: 0, test: 0}\n", ".yaml", ["splits.train: Input should be less than 1"]),
    ("split-negative", ML + "splits: {train: 0.9, valid: -0.1, test: 0.2}\n", ".yaml",
     ["splits.valid: Input should be greater than or equal to 0"]),
    ("pipeline-nested", "kind: pipeline\nstages:\n  - name: a\n    spec: {kind: prepare, source: {type: synthetic, n_rows: 0}, output: {uri: /x}}\n",
     ".yaml", ["stages.0.spec.source.n_rows: Input should be greater than 0"]),
    ("pipeline-duplicate-stage", "kind: pipeline\nstages:\n" + "  - {name: a, spec: {kind: bench, name: datagen}}\n" * 2, ".yaml",
     ["duplicate stage name 'a'"]),
    ("bench-unknown", "kind: bench\nname: nosuchbench\n", ".yaml", ["name: unknown benchmark 'nosuchbench'"]),
    ("bad-cluster-address", "kind: pipeline\ncluster: {address: 'http://x'}\nstages: [{name: a, spec: {kind: bench, name: datagen}}]\n",
     ".yaml", ["cluster.address: cluster address must be"]),
    ("yaml-syntax", "kind: prepare\nsource: {type: movielens100k, path: x\n", ".yaml", ["not valid YAML at line 3"]),
    ("yaml-tab-indent", "kind: prepare\nsource:\n\ttype: synthetic\n", ".yaml", ["not valid YAML at line 3"]),
    ("json-syntax", '{"kind": "prepare",}', ".json", ["not valid JSON at line 1"]),
    ("non-mapping-list", "- kind: prepare\n", ".yaml", ["a job spec must be a mapping with a 'kind', got list"]),
    ("non-mapping-scalar", "just words\n", ".yaml", ["got str"]),
    ("empty-document", "", ".yaml", ["got NoneType"]),
    ("unknown-env-var", "kind: prepare\nsource:\n  type: movielens100k\n  path: ${RECMIX_TEST_UNSET_VAR}\n" + OK_OUTPUT, ".yaml",
     ["source.path: environment variable 'RECMIX_TEST_UNSET_VAR' is not set"]),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case_id,text,suffix,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exits_2_naming_the_field(tmp_path, capsys, monkeypatch, command, case_id, text, suffix, expected):
    monkeypatch.delenv("RECMIX_TEST_UNSET_VAR", raising=False)
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    rc = main([command, str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"recmix: error: {path}"), err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, f"{piece!r} not in:\n{err}"


def test_enough_distinct_cases():
    assert len({c[0] for c in CASES}) >= 25 and len({c[1] for c in CASES}) == len(CASES)


def test_missing_spec_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_every_error_reported_at_once(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        kind: prepare
        source: {type: synthetic, n_rows: 0, seed: -1, bogus: 1}
        output: {uri: 'gs://x'}
        splits: {train: 2}
        """))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid job spec (5 errors)" in err
    for piece in ("source.n_rows", "source.seed", "source.bogus", "output.uri", "splits.train"):
        assert f"\n  {piece}: " in err


def test_synthetic_tables_limit(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("kind: prepare\nsource: {type: synthetic, n_rows: 10, n_users: 50000000, history_len: 50}\n" + OK_OUTPUT)
    assert main(["validate", str(path)]) == 2
    assert "source: per-id tables too large" in capsys.readouterr().err
