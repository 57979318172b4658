"""Synthetic `long_history`: off by default (files unchanged), a label term only the long pool carries."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from recmix.jobs.prepare import synthetic
from recmix.platform.specs.prepare import SyntheticSource

BASE = {"type": "synthetic", "n_rows": 20_000, "n_users": 500, "n_items": 300, "history_len": 10, "seed": 3, "noise": 0.5}


def _src(**kw) -> SyntheticSource:
    return SyntheticSource.model_validate({**BASE, **kw})


def test_spec_is_strict():
    assert _src().long_history is None
    with pytest.raises(ValidationError, match=r"long_history.pool_len \(10\) must exceed history_len \(10\)"):
        _src(long_history={"pool_len": 10})
    for bad in ({"pool_len": 100, "weight": 0}, {"pool_len": 100, "weight": 11}, {"pool_len": 100, "shown": 5}, {}):
        with pytest.raises(ValidationError):
            _src(long_history=bad)


def test_option_changes_only_the_labels_through_the_long_term():
    off, on = _src(), _src(long_history={"pool_len": 200, "weight": 1.5})
    t_off, t_on = synthetic.build_tables(off), synthetic.build_tables(on)
    assert t_off.taste is None and np.array_equal(t_off.pool_items, t_on.pool_items) and np.array_equal(t_off.U, t_on.U)
    a, b = synthetic.generate_chunk(off, t_off, 1, 5_000, 15_000), synthetic.generate_chunk(on, t_on, 1, 5_000, 15_000)
    assert b.drop(["label"]).equals(a.drop(["label"]))
    taste = t_on.taste[1:]
    assert abs(taste.mean()) < 1e-4 and abs(taste.std() - 1) < 1e-3
    # Model-free: the labels that changed moved towards the sign of the planted term.
    u, i, y_on, y_off = b["user_id"].to_numpy(), b["item_id"].to_numpy(), b["label"].to_numpy(), a["label"].to_numpy()
    term = t_on.taste[u] * t_on.taste_item[i]
    flipped = y_on != y_off
    assert 0.05 < flipped.mean() < 0.5
    assert np.all((y_on[flipped] > 0.5) == (term[flipped] > 0))
    # The shown pool (10 of 200 entries) says little about the taste: it is a long-history signal.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([on.seed, 3])))
    item_a = rng.standard_normal(on.n_items + 1, dtype=np.float32)
    shown = item_a[t_on.pool_items[1:]].mean(axis=1)
    assert 0 < np.corrcoef(shown, taste)[0, 1] < 0.5
