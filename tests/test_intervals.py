"""analysis/intervals.py: the report's intervals over seeds, checked on hand-made results against a direct
computation written out here (closed-form t quantiles, the Welch-Satterthwaite formula, the t density
integrated numerically), and against scipy's t tests as a second implementation."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from analysis.intervals import NO_INTERVAL, Difference, difference, errorbar, errorbar_label, mean_interval


def t_975_dof2(p: float = 0.975) -> float:
    """Student t quantile for 2 degrees of freedom, closed form: (2p - 1) / sqrt(2 p (1 - p)).
    Tables: t_{0.975,2} = 4.303."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def t_975_dof4(p: float = 0.975) -> float:
    """Student t quantile for 4 degrees of freedom, closed form: 2 sqrt(q - 1), q = cos(acos(sqrt(a)) / 3) / sqrt(a),
    a = 4 p (1 - p). Tables: t_{0.975,4} = 2.776."""
    a = 4 * p * (1 - p)
    return 2 * math.sqrt(math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a) - 1)


def t_cdf(x: float, dof: float, steps: int = 4000) -> float:
    """Student t CDF by Simpson's rule on the density Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) (1 + t²/ν)^(-(ν+1)/2)."""
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    pdf = lambda t: c * (1 + t * t / dof) ** (-(dof + 1) / 2)  # noqa: E731
    h = x / steps
    s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


def sample_sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_closed_form_quantiles_agree_with_the_tables():
    assert t_975_dof2() == pytest.approx(4.302652729911275, rel=1e-9)  # the tabled value
    assert round(t_975_dof2(), 3) == 4.303 and round(t_975_dof4(), 3) == 2.776
    assert t_cdf(t_975_dof2(), 2) == pytest.approx(0.975, abs=1e-10)
    assert t_cdf(t_975_dof4(), 4) == pytest.approx(0.975, abs=1e-10)


def test_mean_interval_is_the_student_t_interval():
    m = mean_interval([1, 1, 3])
    assert m.mean == pytest.approx(5 / 3, rel=1e-12) and m.n == 3 and m.dropped == 0
    assert m.half_width == pytest.approx(t_975_dof2() * math.sqrt(4 / 3) / math.sqrt(3), rel=1e-12)
    # a narrower confidence is a narrower interval: t_{0.95,2}
    assert mean_interval([1, 1, 3], confidence=0.90).half_width == pytest.approx(
        t_975_dof2(0.95) * math.sqrt(4 / 3) / math.sqrt(3), rel=1e-12)


def test_mean_interval_one_value_none_and_non_finite():
    assert mean_interval([7.5]) == (7.5, None, 1, 0)
    assert mean_interval([]) == (None, None, 0, 0)
    assert mean_interval([float("nan"), None, float("inf"), "x"]) == (None, None, 0, 4)
    m = mean_interval([1, float("nan"), 1, None, 3])
    assert (m.n, m.dropped) == (3, 2) and m.half_width == pytest.approx(mean_interval([1, 1, 3]).half_width)
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1, 2], confidence=95)


def test_paired_difference_matches_a_direct_computation():
    a, b = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 1.0, 2: 1.0}
    d = difference(a, b)
    # d_i = [1, 1, 3]: mean 5/3, s_d = sqrt(4/3), half-width = t_{0.975,2} s_d / sqrt(3)
    half = t_975_dof2() * math.sqrt(4 / 3) / math.sqrt(3)
    assert d.paired and d.n == 3 and d.dof == 2 and (d.n_a, d.n_b, d.dropped) == (3, 3, 0)
    assert d.mean == pytest.approx(5 / 3, rel=1e-12)
    assert d.low == pytest.approx(5 / 3 - half, rel=1e-12) and d.high == pytest.approx(5 / 3 + half, rel=1e-12)
    assert d.half_width == pytest.approx(half, rel=1e-12)
    assert not d.excludes_zero  # [-1.20, +4.54]
    assert d.text == "+1.67 [-1.20, +4.54] (3 paired)"
    ci = stats.ttest_rel([1, 2, 4], [0, 1, 1]).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    # b - a is the mirror image
    r = difference(b, a)
    assert (r.mean, r.low, r.high) == pytest.approx((-d.mean, -d.high, -d.low), rel=1e-12)


def test_an_interval_that_excludes_zero_and_pairing_narrows_it():
    a, b = {0: 10.0, 1: 12.0, 2: 11.0}, {0: 8.0, 1: 9.5, 2: 9.0}
    d = difference(a, b)
    diffs = [2.0, 2.5, 2.0]
    half = t_975_dof2() * sample_sd(diffs) / math.sqrt(3)
    assert d.paired and d.mean == pytest.approx(6.5 / 3, rel=1e-12)
    assert (d.low, d.high) == pytest.approx((6.5 / 3 - half, 6.5 / 3 + half), rel=1e-12)
    assert d.low > 0 and d.excludes_zero and d.text == "+2.17 [+1.45, +2.88] (3 paired; excludes 0)"
    neg = difference(b, a)
    assert neg.high < 0 and neg.excludes_zero and neg.text.endswith("(3 paired; excludes 0)")
    # the same values on different seeds cannot be paired: Welch, wider (the seed noise is not removed)
    unpaired = difference(a, {s + 10: v for s, v in b.items()})
    assert not unpaired.paired and unpaired.half_width > 2 * d.half_width


def test_welch_on_disjoint_seeds_equal_variances_has_4_dof():
    # equal sizes and variances: nu = (2v/3)^2 / (2 (v/3)^2 / 2) = 4 exactly
    d = difference({0: 1.0, 1: 2.0, 2: 3.0}, {3: 5.0, 4: 6.0, 5: 7.0})
    half = t_975_dof4() * math.sqrt(1 / 3 + 1 / 3)
    assert not d.paired and d.n == 6 and d.dof == pytest.approx(4.0, rel=1e-12)
    assert d.mean == pytest.approx(-4.0) and (d.low, d.high) == pytest.approx((-4 - half, -4 + half), rel=1e-12)
    assert d.excludes_zero and d.text == "-4.00 [-6.27, -1.73] (3 vs 3, Welch; excludes 0)"


def test_welch_on_unequal_seed_sets_matches_the_welch_satterthwaite_formula():
    xa, xb = [1.0, 2.0, 4.0, 9.0], [3.0, 3.5]
    d = difference(dict(zip(["s0", "s1", "s2", "s3"], xa)), dict(zip(["s7", "s8"], xb)))
    va, vb = sample_sd(xa) ** 2 / 4, sample_sd(xb) ** 2 / 2
    nu = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 1)
    se = math.sqrt(va + vb)
    assert not d.paired and (d.n_a, d.n_b, d.n) == (4, 2, 6)
    assert d.mean == pytest.approx(4.0 - 3.25, rel=1e-12)
    assert d.dof == pytest.approx(nu, rel=1e-12) and 3 < nu < 4  # not an integer: no table
    # the quantile used: the point where the t(nu) CDF reaches 0.975
    assert t_cdf(d.half_width / se, nu) == pytest.approx(0.975, abs=1e-9)
    assert not d.excludes_zero and d.text.endswith("(4 vs 2, Welch)")
    ci = stats.ttest_ind(xa, xb, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-12)


def test_one_seed_gives_no_interval():
    d = difference({0: 5.0}, {0: 3.0})
    assert d.mean == pytest.approx(2.0) and d.low is None and d.high is None and not d.has_interval
    assert not d.excludes_zero and not d.paired and d.half_width is None
    assert d.text == f"+2.00 ({NO_INTERVAL})" and NO_INTERVAL == "one seed: no interval"
    # three seeds against one (sharing one): still no interval
    d = difference({0: 5.0, 1: 6.0, 2: 7.0}, {0: 3.0})
    assert d.text == f"+3.00 ({NO_INTERVAL})" and (d.n_a, d.n_b) == (3, 1)
    # two values each but only one seed shared: not paired, Welch over all values
    d = difference({0: 5.0, 1: 6.0}, {1: 3.0, 2: 4.0})
    assert not d.paired and d.has_interval and d.dof == pytest.approx(2.0)  # equal sizes and variances


def test_non_finite_and_missing_values_are_dropped_and_counted():
    ref = difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 1.0, 2: 1.0})
    d = difference({0: 1.0, 1: 2.0, 2: 4.0, 3: float("nan"), 4: None},
                   {0: 0.0, 1: 1.0, 2: 1.0, 3: 7.0, 4: float("inf")})
    assert d.paired and d.n == 3 and d.dropped == 3 and (d.n_a, d.n_b) == (3, 4)
    assert (d.mean, d.low, d.high, d.text) == (ref.mean, ref.low, ref.high, ref.text)
    empty = difference({0: float("nan"), 1: None}, {0: 1.0, 1: 2.0})
    assert empty.mean is None and empty.text == "n/a" and empty.dropped == 2 and not empty.excludes_zero
    assert difference({}, {}).text == "n/a"


def test_partly_overlapping_seeds_are_paired_on_the_shared_ones():
    ref = difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 1.0, 2: 1.0})
    # seed 5 only in a, seed 7 only in b; seed keys as text on one side
    d = difference({0: 1.0, 1: 2.0, 2: 4.0, 5: 100.0}, {"0": 0.0, "1": 1.0, "2": 1.0, "7": -50.0})
    assert d.paired and d.n == 3 and (d.n_a, d.n_b) == (4, 4)
    assert (d.mean, d.low, d.high, d.text) == (ref.mean, ref.low, ref.high, ref.text)
    with pytest.raises(ValueError, match="twice"):
        difference({0: 1.0, "0": 2.0}, {0: 1.0})


def test_difference_is_a_frozen_record():
    d = difference({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.5})
    assert isinstance(d, Difference) and d.confidence == 0.95
    with pytest.raises(Exception):
        d.mean = 0.0  # type: ignore[misc]


def test_errorbar_is_the_mean_interval_of_a_point():
    mean, half = errorbar([1, 1, 3])
    assert mean == pytest.approx(5 / 3) and half == pytest.approx(t_975_dof2() * math.sqrt(4 / 3) / math.sqrt(3))
    assert errorbar([2.0, float("nan")]) == (2.0, None)  # one seed: no bar
    assert errorbar([None, float("nan")]) is None  # nothing to draw
    assert errorbar_label([1, 1, 3]) == "1.67 ± 2.87" and errorbar_label([2.0]) == "2.00" and errorbar_label([]) == ""
