"""Training checkpoints (state.py) and the artifact's read-only row tables, without Ray."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from recmix.jobs.train import state
from recmix.models.artifact import SnapshotLookup
from recmix.models.embedding import TableSpec
from recmix.platform.errors import RecmixError


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    st = state.TrainerState(epoch=2, step=17, best_auc=0.7, best_epoch=1, history=[{"epoch": 1}], meta={"dataset_version": "v1"})
    d = state.save(st, model, opt, {k: v * 0 for k, v in model.state_dict().items()})
    try:
        rng = torch.get_rng_state()
        torch.rand(3)
        other = torch.nn.Linear(3, 2)
        other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
        got, best = state.load(d, other, other_opt)
        assert got == st and torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
        assert all((v == 0).all() for v in best.values())
        assert other_opt.state_dict()["state"][0]["step"] == 1
        with pytest.raises(RecmixError, match="belongs to dataset_version 'v1', this run has 'v2'"):
            state.check_meta(got, {"dataset_version": "v2"}, d)
        for name in state.FILES:   # every file readable with weights_only
            torch.load(os.path.join(d, name), weights_only=True)
        with open(os.path.join(d, "optimizer.pt"), "r+b") as f:
            f.seek(10)
            f.write(b"\x00\x01")
        with pytest.raises(RecmixError, match=r"is corrupt \(optimizer.pt"):
            state.verify(d, "ck")
        os.remove(os.path.join(d, "best.pt"))
        with pytest.raises(RecmixError, match=r"is partial \(best.pt is missing\)"):
            state.verify(d, "ck")
        os.remove(os.path.join(d, state.TRAINER))
        with pytest.raises(RecmixError, match="is partial"):
            state.verify(d, "ck")
    finally:
        shutil.rmtree(d)


def test_snapshot_lookup_serves_stored_rows_and_zeros_for_unseen_ids():
    rows = {"item": (np.array([7, 2, 40], np.int64), np.arange(6, dtype=np.float32).reshape(3, 2))}
    lk = SnapshotLookup({"item": TableSpec("item", 50, 2, False), "user": TableSpec("user", 9, 2, False)}, rows)
    out = lk.lookup("item", torch.tensor([[2, 7], [3, -1]]))
    assert out.tolist() == [[[2.0, 3.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
    assert lk.lookup("user", torch.tensor([1, 2])).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert not lk.state_dict()   # rows are not part of the dense state_dict


def test_a_checkpoint_registered_after_the_first_check_is_verified_and_announced(tmp_path):
    """The rerun of a killed driver reads the latest checkpoint twice: before Ray starts (preflight) and right
    before Ray Train does (recheck): the killed run's Ray Train processes may register one more in between."""
    import json

    from recmix.jobs.train import RAY_SNAPSHOT, preflight, recheck
    from recmix.platform.specs.job import JOB_ADAPTER

    spec = JOB_ADAPTER.validate_python(dict(kind="train", dataset=dict(uri=str(tmp_path / "ds")), output=str(tmp_path / "out"),
                                            model=dict(arch="dlrm_mlp")))
    run = tmp_path / "out" / "checkpoints" / "train"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def register(step: int) -> str:
        d = state.save(state.TrainerState(step=step), model, opt, None)
        shutil.move(d, run / f"checkpoint-{step:09d}-0")
        (run / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": f"checkpoint-{step:09d}-0"}}))
        return str(run / f"checkpoint-{step:09d}-0")

    run.mkdir(parents=True)
    logs: list[str] = []
    first = register(10)
    assert preflight(spec, False, logs.append) == first and "from checkpoint-000000010-0 (step 10)" in logs[-1]
    recheck(spec, first, logs.append)
    assert len(logs) == 1                      # nothing moved: nothing said
    newer = register(20)
    recheck(spec, first, logs.append)
    assert "from checkpoint-000000020-0 (step 20) instead" in logs[-1]
    with open(os.path.join(newer, "model.pt"), "r+b") as f:   # the newer one is verified like the first
        f.write(b"\x00\x01")
    with pytest.raises(RecmixError, match="checkpoint-000000020-0 is corrupt"):
        recheck(spec, first, logs.append)


def test_a_user_facing_error_behind_a_failed_ray_train_run_becomes_one_line():
    """A PushError (a shard gone past the push retries) inside a worker reaches the driver wrapped by Ray and
    Ray Train; the driver names it in one line (exit 2). Any other error keeps its traceback."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from recmix.actors.backend import PushError
    from recmix.jobs.train import failure_line

    push = PushError("push to embedding shard(s) [0] not applied after 30 attempts (ActorDiedError: gone)\nmore", [])
    wrapped = RayTaskError("train_fn", "Traceback ...", push)
    err = WorkerGroupError("rank 1 failed", {1: ValueError("other rank"), 0: wrapped})
    assert failure_line(err) == "push to embedding shard(s) [0] not applied after 30 attempts (ActorDiedError: gone)"
    assert failure_line(WorkerGroupError("x", {0: ValueError("a bug")})) is None


def _saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    d = state.save(state.TrainerState(epoch=1, step=5), model, opt, None)
    dest = tmp_path / "ck"
    shutil.move(d, dest)
    return str(dest)


def test_each_resuming_worker_reads_its_own_copy_of_the_checkpoint(tmp_path):
    """Ray's `to_directory()` hands every worker on a node one shared folder, and a worker that takes the lock
    after another finished downloads again over the files the other is reading (a resumed run once refused a
    checkpoint whose rng.pt read as 0 bytes). `private_copy` gives each caller its own folder."""
    import ray.train

    from recmix.jobs.train.worker import private_copy

    ck = ray.train.Checkpoint.from_directory(_saved(tmp_path))
    shared = ck.to_directory()
    try:
        assert ck.to_directory() == shared      # the cause: one folder for every caller
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    a, b = private_copy(ck), private_copy(ck)
    try:
        assert len({a, b, shared, ck.path}) == 4
        assert state.verify(a, "a")["state"]["step"] == state.verify(b, "b")["state"]["step"] == 5
    finally:
        shutil.rmtree(a), shutil.rmtree(b)


def test_fit_removes_the_resume_copy_even_when_it_refuses_the_checkpoint(tmp_path):
    from recmix.jobs.train import loop

    d = _saved(tmp_path)
    with open(os.path.join(d, "rng.pt"), "wb"):
        pass                                     # truncated to 0 bytes, as the race left it

    class Resuming(loop.LocalContext):
        def latest_checkpoint(self):
            return d, "runs/r1/checkpoint-000000005"     # a local copy, and the path it was copied from

    with pytest.raises(RecmixError, match=r"checkpoint runs/r1/checkpoint-000000005 is corrupt \(rng.pt: 0 bytes"):
        loop.fit(torch.nn.Linear(3, 2), None, None, Resuming(lambda line: None), eval_batch_size=4, epochs=1,
                 patience=1)
    assert not os.path.exists(d)
