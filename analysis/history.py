"""Reading a trial's `history.csv` (Lightning CSVLogger output, flattened).

Lightning writes sparse rows (step-level and epoch-level metrics on different rows, NaN elsewhere)
and column names vary (`train/loss_epoch`, `train_loss`, `val/mIoU`, `knn_acc`...), so columns are
found by pattern and every series is reduced to one value per epoch (the last logged) when an
`epoch` column exists, else per step, else per row.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from analysis.results import Trial, finite


@lru_cache(maxsize=512)
def _read(path: str, mtime: float) -> Optional[pd.DataFrame]:
    try:
        df = pd.read_csv(path)
    except Exception:  # empty, truncated or garbage file: no curves for this trial
        return None
    if df.empty:
        return None
    return df


def read_history(trial: Trial) -> Optional[pd.DataFrame]:
    p = trial.history_path
    if p is None:
        return None
    try:
        return _read(str(p), p.stat().st_mtime)
    except OSError:
        return None


def find_column(df: pd.DataFrame, include: Sequence[str], exclude: Sequence[str] = (),
                prefer: Sequence[str] = ()) -> Optional[str]:
    """First numeric column whose lower-cased name contains all of `include` and none of `exclude`;
    among those, the ones containing more of `prefer` come first."""
    cands = []
    for c in df.columns:
        lc = str(c).lower()
        if all(s in lc for s in include) and not any(s in lc for s in exclude):
            col = pd.to_numeric(df[c], errors="coerce")
            if col.notna().any():
                cands.append(c)
    if not cands:
        return None
    return sorted(cands, key=lambda c: (-sum(p in str(c).lower() for p in prefer), len(str(c))))[0]


def series(df: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, x label) of a column, one point per epoch when possible."""
    y = pd.to_numeric(df[col], errors="coerce")
    ok = y.notna()
    for xcol, label in (("epoch", "epoch"), ("step", "step")):
        if xcol in df.columns:
            x = pd.to_numeric(df[xcol], errors="coerce")
            ok2 = ok & x.notna()
            if ok2.any():
                s = pd.DataFrame({"x": x[ok2], "y": y[ok2]}).groupby("x", sort=True)["y"].last()
                return s.index.to_numpy(dtype=float), s.to_numpy(dtype=float), label
    return np.arange(int(ok.sum()), dtype=float), y[ok].to_numpy(dtype=float), "logged point"


def loss_column(df: pd.DataFrame) -> Optional[str]:
    return find_column(df, ["loss"], exclude=["val"], prefer=["epoch", "train"])


def knn_column(df: pd.DataFrame) -> Optional[str]:
    return find_column(df, ["knn"], exclude=["init"], prefer=["acc", "val"])


def miou_column(df: pd.DataFrame) -> Optional[str]:
    return find_column(df, ["miou"], exclude=["train"], prefer=["val"])


def knn_at_fraction(trial: Trial, fraction: float) -> Optional[float]:
    """k-NN accuracy after `fraction` (0..1] of the run's training, interpolated over epochs.

    fraction >= 1 is the final `knn_acc`. Needs a per-epoch k-NN column in history.csv; the point at
    0 epochs is `knn_acc_init` when present.
    """
    final = finite(trial.metrics.get("knn_acc"))
    if fraction >= 1 - 1e-9:
        return final
    df = read_history(trial)
    if df is None:
        return None
    col = knn_column(df)
    if col is None:
        return None
    x, y, xlabel = series(df, col)
    if xlabel != "epoch" or len(x) == 0:
        return None
    done = x + 1.0  # value logged at epoch e = after e+1 completed epochs
    epochs = finite(trial.get("epochs")) or float(done.max())
    init = finite(trial.metrics.get("knn_acc_init"))
    if init is not None:
        done, y = np.concatenate([[0.0], done]), np.concatenate([[init], y])
    target = fraction * epochs
    if target < done.min():
        return None
    return float(np.interp(target, done, y))
