"""Synthetic `field_cross`: off by default (files unchanged), a pure user x item x context cross in the labels."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from recmix.jobs.prepare import synthetic
from recmix.platform.specs.prepare import SyntheticSource

BASE = {"type": "synthetic", "n_rows": 200_000, "n_users": 500, "n_items": 300, "history_len": 10, "seed": 3, "noise": 0.5}


def _src(**kw) -> SyntheticSource:
    return SyntheticSource.model_validate({**BASE, **kw})


def test_spec_is_strict():
    assert _src().field_cross is None and _src(field_cross={}).field_cross.weight == 1.0
    for bad in ({"weight": 0}, {"weight": 11}, {"fields": ["hour"]}):
        with pytest.raises(ValidationError):
            _src(field_cross=bad)


def test_the_term_is_a_pure_three_way_cross():
    t = synthetic.build_tables(_src(field_cross={"weight": 2.0}))
    c = t.cross.astype(np.float64)
    assert abs(c.std() - 2.0) < 1e-5
    for axis in ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2)):   # every one- and two-field margin is zero
        assert np.abs(c.mean(axis=axis)).max() < 1e-5
    assert np.array_equal(t.first_genre, [min(g) for g in t.genres.to_pylist()])


def test_option_changes_only_the_labels_through_the_cross():
    off, on = _src(), _src(field_cross={"weight": 1.5})
    t_off, t_on = synthetic.build_tables(off), synthetic.build_tables(on)
    assert t_off.cross is None and np.array_equal(t_off.pool_ratings, t_on.pool_ratings) and np.array_equal(t_off.U, t_on.U)
    a, b = synthetic.generate_chunk(off, t_off, 1, 50_000, 150_000), synthetic.generate_chunk(on, t_on, 1, 50_000, 150_000)
    assert b.drop(["label"]).equals(a.drop(["label"]))
    u, i, h = b["user_id"].to_numpy(), b["item_id"].to_numpy(), b["hour"].to_numpy()
    term = t_on.cross[b["occupation"].to_numpy(), t_on.first_genre[i], h]
    y_on, y_off = b["label"].to_numpy(), a["label"].to_numpy()
    flipped = y_on != y_off
    assert 0.05 < flipped.mean() < 0.5
    assert np.all((y_on[flipped] > 0.5) == (term[flipped] > 0))   # changed labels moved towards the term's sign
    # No single field carries it: the label rate moves little by hour (sampling only), a lot by crossed cell.
    d = y_on - y_off
    by_hour = np.array([d[h == k].mean() for k in np.unique(h)])
    cell = np.where(term > 0.5, 1, np.where(term < -0.5, -1, 0))
    assert np.abs(by_hour).max() < 0.25 * (d[cell == 1].mean() - d[cell == -1].mean())
    assert np.corrcoef(term, y_on - y_off)[0, 1] > 0.3
    assert u.size == 100_000
