"""The paired bootstrap interval covers known differences and says when a gap is noise."""

import numpy as np
import pytest

from freezecache.accounting.stats import pack_correct, paired_gap, unpack_correct, verdict


def _runs(p: float, seeds: int = 3, n: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((seeds, n)) < p


def test_interval_covers_a_known_difference():
    # b is a with 2% of the images (its correct ones) made wrong: a known gap
    a = _runs(0.9)
    b = a.copy()
    flip = np.random.default_rng(1).random(a.shape) < 0.02
    b[flip & a] = False
    truth = 100 * (a.mean() - b.mean())
    got = paired_gap(a, b, reps=2000)
    assert got["gap"] == pytest.approx(truth)
    assert got["lo"] < truth < got["hi"] and got["lo"] > 0
    assert verdict(got) == "significant"


def test_same_distribution_is_within_noise():
    a, b = _runs(0.95, seed=2), _runs(0.95, seed=3)
    got = paired_gap(a, b, reps=2000)
    assert got["lo"] < 0 < got["hi"] and verdict(got) == "within noise"
    # about 0.3 points of standard error per accuracy on 5000 images: the interval is ~1 point
    assert 0.3 < got["hi"] - got["lo"] < 2.0


def test_coverage_is_about_95_percent():
    """Over repeated experiments with a true gap of 1 point, the interval covers it ~95%."""
    rng = np.random.default_rng(4)
    covered = 0
    for i in range(60):
        u = rng.random((3, 2000))
        a, b = u < 0.91, u < 0.90  # nested: the gap is exactly the mass in [0.90, 0.91)
        got = paired_gap(a, b, reps=400, seed=i)
        covered += got["lo"] <= 1.0 <= got["hi"]
    assert covered >= 50


def test_correctness_bits_round_trip():
    c = np.random.default_rng(5).random(5003) < 0.5
    assert np.array_equal(unpack_correct(pack_correct(c), 5003), c)
