"""Summary statistics on known samples."""
import dataclasses

import pytest

from engine.stats import NOISE_THRESHOLD, Summary, percentile


def test_known_samples_match_linear_interpolation():
    s = Summary.from_samples([float(v) for v in range(10, 0, -1)])  # order must not matter
    assert s.median == pytest.approx(5.5)
    assert s.p10 == pytest.approx(1.9)
    assert s.p90 == pytest.approx(9.1)
    # p25 = 3.25, p75 = 7.75 -> IQR 4.5
    assert s.iqr_rel == pytest.approx(4.5 / 5.5)


def test_percentile_agrees_with_numpy_default():
    np = pytest.importorskip("numpy")
    values = sorted([3.1, 7.4, 2.2, 9.9, 5.0, 5.5, 1.2])
    for q in (0, 10, 25, 50, 75, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_single_sample_has_no_spread():
    s = Summary.from_samples([12.5])
    assert (s.median, s.p10, s.p90, s.iqr_rel) == (12.5, 12.5, 12.5, 0.0)
    assert not s.noisy


def test_zero_median_gives_zero_relative_spread():
    assert Summary.from_samples([0.0, 0.0, 0.0]).iqr_rel == 0.0


def test_no_samples_is_an_error():
    with pytest.raises(ValueError):
        Summary.from_samples([])


def test_noise_flag_uses_threshold():
    steady = Summary.from_samples([100.0, 101.0, 99.0, 100.5, 100.2])
    noisy = Summary.from_samples([100.0, 150.0, 60.0, 120.0, 80.0])
    assert NOISE_THRESHOLD == 0.10
    assert not steady.noisy and steady.iqr_rel < NOISE_THRESHOLD
    assert noisy.noisy and noisy.iqr_rel > NOISE_THRESHOLD


def test_to_dict_repr_and_immutability():
    s = Summary.from_samples([1.0, 2.0, 3.0])
    assert s.to_dict() == {"median": 2.0, "p10": 1.2, "p90": pytest.approx(2.8), "iqr_rel": 0.5}
    assert "median=2" in repr(s) and "IQR/median=50.0%" in repr(s) and "noisy" in repr(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.median = 3.0
