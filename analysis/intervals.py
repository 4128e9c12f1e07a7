"""Confidence intervals over seeds: what the report prints where it compares rows or draws error bars.

A mean over seeds and a difference between two rows are only read against their seed-to-seed noise:

- `mean_interval(values)`: the mean of one row's seeds and the half-width of its Student t interval,
  x̄ ± t_{1-α/2, n-1} · s / √n (s: the sample standard deviation, n - 1 degrees of freedom; Student
  1908, "The probable error of a mean", Biometrika 6(1)).
- `difference(a, b)`: the mean difference a - b of two rows given as {seed: value}, with its interval:
  * paired, when the rows share two or more seeds: over the shared seeds only, d_i = a_i - b_i,
    d̄ ± t_{1-α/2, n-1} · s_d / √n (the paired t interval: a seed fixes the data order, the augmentations
    and the head's initialisation of both rows, so its difference removes the noise they share);
  * otherwise Welch's unpaired interval, when each side has two or more values:
    x̄_a - x̄_b ± t_{1-α/2, ν} · √(s_a²/n_a + s_b²/n_b), with the Welch-Satterthwaite degrees of freedom
    ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)² / (n_a - 1) + (s_b²/n_b)² / (n_b - 1))
    (Welch 1947, "The generalization of 'Student's' problem when several different population
    variances are involved", Biometrika 34(1-2); Satterthwaite 1946, Biometrics Bulletin 2(6));
  * otherwise no interval: "one seed: no interval".
  These are the intervals of scipy.stats.ttest_rel(a, b) and ttest_ind(a, b, equal_var=False)
  `.confidence_interval()`; the quantile t_{q, ν} is scipy.stats.t.ppf(q, ν).
- `errorbar(values)`: (mean, half-width or None) of one point of a bar or line figure, the same
  interval as `mean_interval`; `errorbar_label` writes it as "12.30 ± 1.40".

Values that are missing or not finite (None, NaN, inf, text) are dropped and counted (`dropped`). Seeds
are matched by their text (`0` and `"0"` are the same seed).

The report cell (`Difference.text`), d the mean difference, [lo, hi] its interval, `digits` decimals:

    +2.10 [+0.40, +3.80] (3 paired; excludes 0)    paired over 3 shared seeds, the interval excludes zero
    +1.67 [-2.64, +5.97] (3 paired)                paired, the interval contains zero: not resolved
    -4.00 [-6.27, -1.73] (3 vs 3, Welch; excludes 0)   unpaired, 3 seeds on each side
    +2.10 (one seed: no interval)                  too few seeds for an interval: d alone
    n/a                                            a side has no finite value
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import numpy as np
from scipy import stats

from analysis.results import finite

NO_INTERVAL = "one seed: no interval"
CONFIDENCE = 0.95


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence={confidence!r} must lie strictly between 0 and 1 (e.g. 0.95)")
    return c


def t_quantile(confidence: float, dof: float) -> float:
    """The two-sided Student t quantile t_{1-α/2, dof} for confidence 1 - α (scipy.stats.t.ppf)."""
    return float(stats.t.ppf(0.5 + _check_confidence(confidence) / 2.0, dof))


def _clean(values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """The finite values as floats, and how many were dropped."""
    vals = list(values)
    kept = [v for v in (finite(x) for x in vals) if v is not None]
    return np.asarray(kept, dtype=float), len(vals) - len(kept)


# ----------------------------------------------------------------------------- one row
class MeanInterval(NamedTuple):
    mean: Optional[float]  # None when no finite value
    half_width: Optional[float]  # None when n < 2: no interval
    n: int  # finite values used
    dropped: int = 0  # missing / non-finite values left out


def mean_interval(values: Iterable[Any], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean of `values` and the half-width of its Student t interval, t_{1-α/2, n-1} · s / √n
    (s with ddof=1); the half-width is None for fewer than two finite values."""
    _check_confidence(confidence)
    arr, dropped = _clean(values)
    n = int(arr.size)
    if n == 0:
        return MeanInterval(None, None, 0, dropped)
    mean = float(arr.mean())
    if n < 2:
        return MeanInterval(mean, None, n, dropped)
    half = t_quantile(confidence, n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return MeanInterval(mean, half, n, dropped)


def errorbar(values: Iterable[Any], confidence: float = CONFIDENCE) -> Optional[tuple[float, Optional[float]]]:
    """(mean, half-width) of one point of a figure: the `mean_interval` over its seeds; the half-width
    is None for a single seed (draw no bar: a zero-height bar would read as no spread), and the whole
    result None when no value is finite (draw no point)."""
    m = mean_interval(values, confidence)
    return None if m.mean is None else (m.mean, m.half_width)


def errorbar_label(values: Iterable[Any], digits: int = 2, confidence: float = CONFIDENCE) -> str:
    """A figure's annotation of one point: "12.30 ± 1.40" (± the interval's half-width), "12.30" for one
    seed, "" for no finite value."""
    got = errorbar(values, confidence)
    if got is None:
        return ""
    mean, half = got
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


# ----------------------------------------------------------------------------- two rows
@dataclass(frozen=True)
class Difference:
    """The mean difference a - b of two rows over seeds and its interval (module docstring)."""

    mean: Optional[float]  # a - b: mean of the paired differences, else mean(a) - mean(b); None: a side is empty
    low: Optional[float]  # interval bounds; None when there is no interval
    high: Optional[float]
    n: int  # seeds behind the interval: shared seeds when paired, else n_a + n_b
    paired: bool  # paired t interval over the shared seeds (else Welch, or no interval)
    excludes_zero: bool  # the interval lies strictly above or below 0 (False when there is no interval)
    text: str  # the report cell
    n_a: int = 0  # finite values of a (all of them, shared or not)
    n_b: int = 0
    dof: Optional[float] = None  # degrees of freedom of the t quantile (n - 1 paired; Welch-Satterthwaite)
    dropped: int = 0  # missing / non-finite values left out of a and b together
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> Optional[float]:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2.0

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def _side(values: Mapping[Any, Any]) -> tuple[dict[str, float], int]:
    """{seed text: finite value} of one row, and how many values were dropped."""
    out: dict[str, float] = {}
    dropped = 0
    for seed, v in values.items():
        key = str(seed)
        if key in out:
            raise ValueError(f"seed {seed!r} is given twice (seeds are matched by their text)")
        f = finite(v)
        if f is None:
            dropped += 1
        else:
            out[key] = f
    return out, dropped


def _signed(x: float, digits: int) -> str:
    s = f"{x:+.{digits}f}"
    return "+" + s[1:] if float(s) == 0 else s  # no "-0.00"


def difference(a: Mapping[Any, Any], b: Mapping[Any, Any], confidence: float = CONFIDENCE,
               digits: int = 2) -> Difference:
    """Mean difference a - b of two rows given as {seed: value}, with its `confidence` interval: paired t
    over the seeds both rows share when they share two or more, else Welch's unpaired interval when each
    side has two or more values, else none ("one seed: no interval"). `digits`: decimals of `text`."""
    c = _check_confidence(confidence)
    sa, da = _side(a)
    sb, db = _side(b)
    base = dict(n_a=len(sa), n_b=len(sb), dropped=da + db, confidence=c)
    if not sa or not sb:
        return Difference(None, None, None, 0, False, False, "n/a", **base)
    shared = [s for s in sa if s in sb]
    if len(shared) >= 2:
        d = np.asarray([sa[s] - sb[s] for s in shared], dtype=float)
        n, dof = len(shared), float(len(shared) - 1)
        mean = float(d.mean())
        half = t_quantile(c, dof) * float(d.std(ddof=1)) / math.sqrt(n)
        how = f"{n} paired"
        paired = True
    else:
        xa, xb = np.fromiter(sa.values(), float), np.fromiter(sb.values(), float)
        mean = float(xa.mean() - xb.mean())
        if xa.size < 2 or xb.size < 2:
            return Difference(mean, None, None, int(xa.size + xb.size), False, False,
                              f"{_signed(mean, digits)} ({NO_INTERVAL})", **base)
        va, vb = float(xa.var(ddof=1)) / xa.size, float(xb.var(ddof=1)) / xb.size
        n = int(xa.size + xb.size)
        if va + vb > 0:
            dof = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
        else:  # both sides constant: a zero-width interval (the dof do not matter)
            dof = float(n - 2)
        half = t_quantile(c, dof) * math.sqrt(va + vb)
        how = f"{xa.size} vs {xb.size}, Welch"
        paired = False
    low, high = mean - half, mean + half
    excludes = low > 0 or high < 0
    text = (f"{_signed(mean, digits)} [{_signed(low, digits)}, {_signed(high, digits)}] "
            f"({how}{'; excludes 0' if excludes else ''})")
    return Difference(mean, low, high, n, paired, excludes, text, dof=dof, **base)
