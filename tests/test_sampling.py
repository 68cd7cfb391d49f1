"""Farthest-point sampling: exact max-min picks, determinism, eligibility, ties, duplicates."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from facecanon_data.sampling import farthest_point_sampling


def _min_dist(x, idx, picked):
    return np.linalg.norm(x[idx][:, None] - x[picked][None], axis=-1).min(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_pick_maximizes_distance_to_the_picked_set(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 5))
    eligible = rng.random(300) > 0.2
    picks = farthest_point_sampling(x, 25, eligible=eligible)
    assert len(set(picks)) == 25 and eligible[picks].all()
    for j in range(1, len(picks)):
        rest = np.setdiff1d(np.where(eligible)[0], picks[:j])
        best = _min_dist(x, rest, picks[:j]).max()
        assert _min_dist(x, picks[j:j + 1], picks[:j])[0] == pytest.approx(best)
    np.testing.assert_array_equal(picks, farthest_point_sampling(x, 25, eligible=eligible))  # deterministic


def test_already_selected_are_excluded_and_respected():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 3))
    first = farthest_point_sampling(x, 10)
    more = farthest_point_sampling(x, 5, already=first)
    assert not set(more) & set(first)
    rest = np.setdiff1d(np.arange(100), first)
    assert _min_dist(x, more[:1], first)[0] == pytest.approx(_min_dist(x, rest, first).max())


def test_fewer_eligible_than_requested_takes_all_and_warns(caplog):
    x = np.arange(10, dtype=float)[:, None]
    eligible = np.zeros(10, bool)
    eligible[[2, 5, 7]] = True
    with caplog.at_level(logging.WARNING):
        picks = farthest_point_sampling(x, 8, eligible=eligible)
    assert sorted(picks) == [2, 5, 7] and "only 3 eligible" in caplog.text
    assert len(farthest_point_sampling(x, 3, eligible=np.zeros(10, bool))) == 0


def test_ties_and_duplicates():
    # Four corners of a square, each duplicated: ties go to the lowest index, a duplicate of a picked
    # point is only taken once every distinct point is taken.
    corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    x = np.concatenate([corners, corners])
    picks = farthest_point_sampling(x, 5)
    assert set(picks[:4]) == {0, 1, 2, 3}
    assert picks[4] in {4, 5, 6, 7}
    np.testing.assert_array_equal(picks, farthest_point_sampling(x, 5))


def test_non_finite_features_of_eligible_points_are_rejected():
    x = np.array([[0.0], [np.nan], [2.0]])
    assert list(farthest_point_sampling(x, 2, eligible=np.array([True, False, True]))) in ([0, 2], [2, 0])
    with pytest.raises(ValueError, match="finite"):
        farthest_point_sampling(x, 2)
