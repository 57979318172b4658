"""Serving without Ray: the serve spec, request models, feature encoding, the scorer and its user cache,
UserState take/cat, and the Serve config export (validated with Serve's own schema)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from pydantic import ValidationError

from recmix.jobs.serve.config import serve_config, with_absolute_artifact
from recmix.jobs.serve.features import FeatureCodec, RankRequest, RequestError
from recmix.jobs.serve.scorer import Scorer, UserCache, ranking
from recmix.models.artifact import load_artifact
from recmix.models.toy import toy_schema
from recmix.models.ugsep import UserState
from recmix.platform.specs.load import parse_spec
from recmix.platform.specs.serve import ServeSpec
from tests.serve_fixture import offline_scores, request_rows, write_artifact


def spec(**kw) -> ServeSpec:
    return ServeSpec.model_validate({"kind": "serve", "artifact": {"uri": "./a"}, **kw})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_artifact(write_artifact(str(tmp_path_factory.mktemp("art"))))


def test_spec_defaults_and_strictness():
    s = spec()
    assert (s.http.host, s.artifact.version, s.replicas.min, s.quant.value) == ("127.0.0.1", "LATEST", 1, "off")
    with pytest.raises(ValidationError, match="max_replica"):
        spec(replicas={"max_replica": 2})
    with pytest.raises(ValidationError, match="replicas.min 3 is larger than replicas.max 2"):
        spec(replicas={"min": 3, "max": 2})
    with pytest.raises(ValidationError, match="max_batch_size 32 exceeds replicas.max_ongoing_requests 16"):
        spec(batching={"max_batch_size": 32})
    with pytest.raises(ValidationError, match="look_back_period_s"):
        spec(replicas={"look_back_period_s": 5})
    assert parse_spec({"kind": "serve", "artifact": {"uri": "s3://bucket/a"}}, "x").kind == "serve"


def test_sample_and_lifetime_and_serve_as_a_pipeline_stage():
    s = spec(sample={"dataset": "./d"}, lifetime="stop")
    assert (s.sample.split, s.sample.requests, s.sample.candidates, s.lifetime.value) == ("test", 200, 50, "stop")
    with pytest.raises(ValidationError, match="lifetime 'stop' removes the application after the sample requests"):
        spec(lifetime="stop")
    with pytest.raises(ValidationError, match="sample.candidates 2000 exceeds limits.max_candidates 1024"):
        spec(sample={"dataset": "./d", "candidates": 2000})
    with pytest.raises(ValidationError, match="split"):
        spec(sample={"dataset": "./d", "split": "dev"})
    p = parse_spec({"kind": "pipeline", "stages": [{"name": "s", "spec": {"kind": "serve", "artifact": {"uri": "a"}}}]},
                   "x")
    assert p.stages[0].spec.kind == "serve"


def test_pipeline_headlines():
    from recmix.jobs.pipeline import headline

    assert headline({"test": {"auc": 0.71234}, "valid": {}}) == "test AUC 0.7123"
    sample = {"ok": 9, "requests": 10, "candidates": 5, "p50_ms": 3.21, "p99_ms": 9.9, "max_abs_diff": 2e-7,
              "agree": True, "tolerance": 1e-5}
    assert headline({"sample": sample}) == ("9/10 sample requests x 5 candidates: p50 3.2 ms, p99 9.9 ms; served vs "
                                            "offline max |diff| 2.00e-07 (within 1e-05)")
    assert headline({"rows": 3}) == "" and headline(None) == ""


def test_serve_config_passes_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    s = spec(replicas={"min": 1, "max": 3, "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 11,
                       "cpus": 0.5}, http={"port": 8123})
    cfg = serve_config(s)
    parsed = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    app = parsed.applications[0]
    assert app.import_path == "recmix.jobs.serve.app:build_app"
    dep = app.deployments[0]
    assert dep.name == "Ranker" and dep.autoscaling_config["max_replicas"] == 3
    assert ServeSpec.model_validate(app.args["spec"]) == s     # the replicas rebuild the same spec
    assert with_absolute_artifact(s).artifact.uri == os.path.abspath("./a")   # what run and the CLI deploy
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 8123}


@pytest.mark.parametrize("body, msg", [
    ({"user": {}, "candidates": [{}], "extra": 1}, "extra"),
    ({"candidates": [{}]}, "user"),
    ({"user": {}, "candidates": []}, "candidates"),
    ({"user": {"score": math.nan}, "candidates": [{}]}, "user"),
    ({"user": {"score": math.inf}, "candidates": [{}]}, "user"),
    ({"user": {"hour": True}, "candidates": [{}]}, "user"),
    ({"user": {"hour": "3"}, "candidates": [{}]}, "user"),
    ({"user": {}, "candidates": [{}], "top_k": 0}, "top_k"),
])
def test_request_model_refuses(body, msg):
    with pytest.raises(ValidationError, match=msg):
        RankRequest.model_validate(body)


def test_codec_encodes_like_training_and_takes_unknown_path():
    codec = FeatureCodec(toy_schema())
    body = request_rows(3)
    body["candidates"][0]["item_id"] = 999          # outside vocab 40: unknown -> 0
    body["candidates"][1]["genres"] = [2, 77, 3]    # 77 outside vocab 19: dropped like padding
    enc = codec.encode(RankRequest.model_validate(body))
    b = enc.batch()
    assert b["item_id"][0] == 0 and enc.unknown_ids == 2
    assert b["genres"][1].tolist() == [2, 3, -1, -1]
    assert b["hist_items"].shape == (3, 6) and b["hist_items"][2, -1] == -1
    assert b["score"].dtype == torch.float32 and b["user_id"].tolist() == [3, 3, 3]
    assert enc.user_id == 3


def test_vectorized_columns_equal_the_value_by_value_reading():
    """The codec converts a column at once with numpy; the checked per-value path (which names a bad value)
    must give the same tensors and unknown counts, on ids in and outside the vocabularies, hashed negatives,
    empty and full lists, and dense values sent as a scalar or a 1-list."""
    import random

    from recmix.jobs.serve.features import _column, _column_checked

    rng = random.Random(0)
    schema = toy_schema()
    for f in schema.inputs:
        for _ in range(5):
            n = rng.randrange(1, 40)
            if f.type.value == "dense":
                values = [rng.choice([rng.uniform(-1e30, 1e30), [rng.random()], rng.randrange(-9, 9)]) for _ in range(n)]
                values = [v if rng.random() < 0.5 else float(v if not isinstance(v, list) else v[0]) for v in values]
            elif f.type.value == "categorical":
                values = [rng.randrange(-5, 2 * f.n_ids) if f.vocab_size else rng.randrange(-2**63, 2**63)
                          for _ in range(n)]
            else:
                values = [[rng.randrange(-3, f.n_ids + 9) for _ in range(rng.randrange(0, f.max_len + 1))]
                          for _ in range(n)]
            fast, slow = [0], [0]
            a, b = _column(f, values, "candidates", fast), _column_checked(f, values, "candidates", slow)
            assert a.dtype == b.dtype and torch.equal(a, b) and fast == slow, (f.name, values)


def test_aligned_sequence_attributes_are_checked_and_compacted_together():
    """ml-100k's hist_items carries aligned attributes (hist_ratings, hist_gaps: one value per position). A
    request whose lists disagree in length is a 422 naming both; an unknown item id drops its position in all
    three lists, so the model still sees aligned sequences."""
    from recmix.jobs.prepare.builtin import builtin_schema

    schema = builtin_schema(n_users=10, n_items=20, history_len=5)
    assert schema.feature("hist_items").tokens.attributes == ["hist_ratings", "hist_gaps"]
    codec = FeatureCodec(schema)
    user = {"user_id": 1, "age_bucket": 2, "gender": 0, "occupation": 3, "zip_prefix": 77, "hour": 5, "weekday": 1,
            "hist_items": [4, 99, 6], "hist_ratings": [5, 3, 1], "hist_gaps": [1, 2, 3]}
    cands = [{"item_id": 4, "genres": [1], "year_bucket": 3}]
    enc = codec.encode(RankRequest.model_validate({"user": user, "candidates": cands}))
    assert enc.request["hist_items"].tolist() == [[4, 6, -1, -1, -1]]       # 99 > vocab 21: unknown
    assert enc.request["hist_ratings"].tolist() == [[5, 1, -1, -1, -1]]
    assert enc.request["hist_gaps"].tolist() == [[1, 3, -1, -1, -1]]
    assert enc.unknown_ids == 1
    with pytest.raises(RequestError, match="user: feature 'hist_ratings' has 2 ids, 'hist_items' has 3"):
        codec.encode(RankRequest.model_validate({"user": {**user, "hist_ratings": [5, 3]}, "candidates": cands}))
    with pytest.raises(RequestError, match="user: feature 'hist_gaps' .* takes integer ids"):
        codec.encode(RankRequest.model_validate({"user": {**user, "hist_gaps": [1, 2.5, 3]}, "candidates": cands}))


@pytest.mark.parametrize("mutate, msg", [
    (lambda b: b["user"].pop("hour"), "user: missing feature 'hour'"),
    (lambda b: b["user"].update(colour=1), "user: unknown feature 'colour'"),
    (lambda b: b["user"].update(item_id=1), "user: feature 'item_id' belongs in candidates"),
    (lambda b: b["candidates"][1].update(hour=1), r"candidates\[1\]: feature 'hour' belongs in user"),
    (lambda b: b["candidates"][0].pop("genres"), r"candidates\[0\]: missing feature 'genres'"),
    (lambda b: b["user"].update(hist_items=list(range(7))), "more than max_len 6"),
    (lambda b: b["user"].update(hist_items=3), "takes a list of ids"),
    (lambda b: b["user"].update(user_id=[1]), "takes integer ids"),
    (lambda b: b["user"].update(score=[1.0, 2.0]), "takes 1 number"),
    (lambda b: b["user"].update(score=1e39), "finite float32"),
    (lambda b: b["user"].update(zip_prefix=2**64), "outside int64"),
    # candidate columns are converted at once; a bad value is still named (the per-value reading)
    (lambda b: b["candidates"][1].update(item_id=2.5), r"candidates: feature 'item_id' .* got 2.5"),
    (lambda b: b["candidates"][1].update(item_id=2**63), "candidates: feature 'item_id' id 9223372036854775808"),
    (lambda b: b["candidates"][0].update(genres=[1, 2.0]), "candidates: feature 'genres' .* got 2.0"),
    (lambda b: b["candidates"][1].update(genres=[1] * 5), "candidates: feature 'genres' has 5 ids, more than"),
    (lambda b: b["candidates"][1].update(genres=3), "candidates: feature 'genres' .* takes a list of ids"),
])
def test_codec_refuses_with_a_message(mutate, msg):
    body = request_rows(2)
    mutate(body)
    with pytest.raises(RequestError, match=msg):
        FeatureCodec(toy_schema()).encode(RankRequest.model_validate(body))


def test_scorer_matches_offline_and_cache(model):
    codec = FeatureCodec(toy_schema())
    scorer = Scorer(model, "v1", UserCache(8, 60))
    body = request_rows(6)
    miss = scorer.score_many([codec.encode(RankRequest.model_validate(body))])[0]
    hit = scorer.score_many([codec.encode(RankRequest.model_validate(body))])[0]
    assert (miss.cache_hit, hit.cache_hit) == (False, True)
    assert hit.scores == miss.scores
    assert max(abs(a - b) for a, b in zip(miss.scores, offline_scores(model, body))) < 1e-5
    body["user"]["hist_items"] = [9]   # a changed user-side feature: a miss
    assert scorer.score_many([codec.encode(RankRequest.model_validate(body))])[0].cache_hit is False


def test_batched_requests_equal_single_ones(model):
    codec = FeatureCodec(toy_schema())
    bodies = [request_rows(3, seed=s, user=s) for s in range(4)]
    encs = [codec.encode(RankRequest.model_validate(b)) for b in bodies]
    together = Scorer(model, "v1", UserCache(0, 60)).score_many(encs)
    for b, r in zip(bodies, together):
        assert r.batch_requests == 4 and r.cache_hit is False
        assert max(abs(x - y) for x, y in zip(r.scores, offline_scores(model, b))) < 1e-5


def test_cache_bounds_and_ttl():
    now = [0.0]
    c = UserCache(2, 10, clock=lambda: now[0])
    for k in "abc":
        c.put((k,), k)
    assert len(c) == 2 and c.get(("a",)) is None and c.get(("c",)) == "c"
    now[0] = 11
    assert c.get(("c",)) is None


def test_userstate_take_and_cat(model):
    codec = FeatureCodec(toy_schema())
    encs = [codec.encode(RankRequest.model_validate(request_rows(1, seed=s, user=s))) for s in range(3)]
    users = {n: torch.cat([e.request[n] for e in encs]) for n in model.user_names}
    with torch.no_grad():
        st = model.encode_user(users)
    parts = [st.take(torch.tensor([i])) for i in range(3)]
    back = UserState.cat(parts)
    assert back.n_users == 3 and torch.equal(back.f_U, st.f_U)
    assert all(torch.equal(a, b) for a, b in zip(back.x_U, st.x_U))
    assert all(torch.equal(a, b) for la, lb in zip(back.per_layer, st.per_layer) for a, b in zip(la, lb))


def test_ranking_order_and_top_k():
    assert ranking([0.1, 0.9, 0.5, 0.9], None) == [1, 3, 2, 0]
    assert ranking([0.1, 0.9, 0.5], 2) == [1, 2]


def test_w8a16_scorer_within_tolerance(tmp_path):
    """quant: w8a16 swaps the per-token FFN weights for int8 + fp16 scales; on this model (weights N(0, 0.3),
    scores spread over (0, 1)) scores stay within 5e-3 of the float model's (measured <= 7e-4; docs/serving.md)."""
    from recmix.models.quantize import quantize_model
    from recmix.platform.specs.w8a16 import W8A16Config

    root = write_artifact(str(tmp_path), weight_std=0.3)
    model = load_artifact(root)
    q = quantize_model(load_artifact(root), config=W8A16Config())
    codec = FeatureCodec(toy_schema())
    body = request_rows(40, seed=5, user=5)
    r = Scorer(q, "v1", UserCache(0, 1)).score_many([codec.encode(RankRequest.model_validate(body))])[0]
    assert max(abs(a - b) for a, b in zip(r.scores, offline_scores(model, body))) < 5e-3


def test_cli_serve_config_writes_a_deployable_file(tmp_path, capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from recmix.jobs.cli import main

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"kind": "serve", "artifact": {"uri": "rel/artifact", "version": "v3"},
                                    "replicas": {"min": 2, "max": 2}}))
    out = tmp_path / "serve_config.yaml"
    assert main(["serve-config", str(path), "-o", str(out)]) == 0
    parsed = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    assert parsed.applications[0].deployments[0].num_replicas == 2
    assert parsed.applications[0].args["spec"]["artifact"]["uri"] == os.path.abspath("rel/artifact")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"kind": "serve", "artifact": {"uri": "a"},
                                                       "replicas": {"max_replica": 2}}))
    assert main(["serve-config", str(tmp_path / "bad.yaml"), "-o", str(out)]) == 2
    assert "max_replica" in capsys.readouterr().err


def test_run_refuses_a_missing_artifact_before_ray_starts(tmp_path, capsys):
    import yaml

    from recmix.jobs.cli import main

    write_artifact(str(tmp_path / "art"))
    for artifact, want in (({"uri": str(tmp_path / "nothing")}, "not a model artifact"),
                           ({"uri": str(tmp_path / "art"), "version": "v9"}, "not a model artifact")):
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump({"kind": "serve", "artifact": artifact}))
        assert main(["run", str(path)]) == 2          # the unit tier's guard would turn a ray.init into an error
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err


def test_shard_group_needs_an_embedding_snapshot_before_ray_starts(tmp_path, capsys):
    import yaml

    from recmix.jobs.cli import main

    write_artifact(str(tmp_path / "art"))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"kind": "serve", "artifact": {"uri": str(tmp_path / "art")},
                                    "embeddings": {"mode": "shard_group"}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard_group needs an artifact with an embedding snapshot" in err[0], err
    with pytest.raises(ValidationError, match="shard"):
        spec(embeddings={"mode": "shards"})


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("0.0.0.0", True), ("10.1.2.3", True)])
def test_serving_beyond_loopback_warns_with_address_and_auth(monkeypatch, host, warns):
    """Issue 14.8: a spec binding the ranking API beyond loopback is never silent (Serve itself is not started)."""
    from ray import serve

    import recmix.jobs.serve.app as app
    from recmix.jobs import serve as serve_job

    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(app, "application", lambda spec: None)
    spec = ServeSpec.model_validate({"kind": "serve", "artifact": {"uri": "/tmp/a"}, "http": {"host": host}})
    lines: list[str] = []
    serve_job.deploy(spec, log=lines.append)
    warned = [ln for ln in lines if "WARNING" in ln]
    assert bool(warned) == warns, lines
    if warns:
        assert host in warned[0] and "authentication in force: NONE" in warned[0]
