"""Figures of the report (matplotlib, Agg backend, PNG, written atomically).

Every function returns the written path, or None when there is nothing to plot (so the report can
say so instead of showing an empty axis).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from analysis import atomic  # noqa: E402
from analysis.history import knn_column, loss_column, miou_column, read_history, series, find_column  # noqa: E402
from analysis.results import Results, Trial, Variant, axis_header, finite, method_order, pretrain_variant  # noqa: E402
from analysis.intervals import MeanInterval, errorbar, mean_interval  # noqa: E402
from analysis.tables import (  # noqa: E402
    SWEEP_AXIS, PreGroup, _eval_order, emerging_cols, emerging_points, pretrain_groups, segment_groups,
)
from core.stages import PRETRAIN, SEGMENT  # noqa: E402

LINESTYLES = ["-", "--", ":", "-."]
# The report's look, applied only inside the plotting functions below (never to the global rcParams:
# importing the report must not change other figures, e.g. the diagnostics' heatmaps, in the process).
STYLE = {"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8}


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _save(fig, path: Path) -> Path:
    try:
        atomic.save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def _yerr(halves) -> Optional[list]:
    """Error bars from per-point interval half-widths (analysis/intervals.py `errorbar`): none at all when no
    point has one (a single seed has no interval: a zero-height bar would read as zero spread), 0 for the
    points without one otherwise."""
    halves = list(halves)
    return None if all(v is None for v in halves) else [0.0 if v is None else v for v in halves]


def _seed_style(t: Trial, seeds: list) -> str:
    s = t.get("seed")
    return LINESTYLES[seeds.index(s) % len(LINESTYLES)] if s in seeds else "-"


# ----------------------------------------------------------------------------- lambda sweep
def _sweep_value(v: Optional[Variant]) -> Optional[float]:
    if v is None or SWEEP_AXIS not in v or isinstance(v[SWEEP_AXIS], bool):
        return None
    return finite(v[SWEEP_AXIS])


def sweep_lines(res: Results) -> dict[Variant, list[PreGroup]]:
    """The pretraining groups whose labels give a numeric SWEEP_AXIS value, one line per variant
    without that axis (method, backbone, source and any other axis), points sorted by the value."""
    lines: dict[Variant, list[PreGroup]] = {}
    for g in pretrain_groups(res):
        if _sweep_value(g.variant) is not None:
            lines.setdefault(g.variant.without(SWEEP_AXIS), []).append(g)
    return {k: sorted(gs, key=lambda g: _sweep_value(g.variant)) for k, gs in lines.items()}


def sweep_segmentation(res: Results) -> tuple[Optional[str], dict[Variant, list[tuple[float, MeanInterval]]]]:
    """(evaluation, line -> [(value, mIoU mean and 95% t interval)]): segmentation mIoU against the swept axis, for the
    evaluation whose finished trials cover the most values of it (ties: the declared order)."""
    per_ev: dict[str, dict[Variant, dict[float, list[float]]]] = {}
    for t in res.stage(SEGMENT):
        x, y = _sweep_value(t.variant), finite(t.metrics.get("mIoU"))
        if x is None or y is None:
            continue
        ev = str(t.get("evaluation") or "custom")
        per_ev.setdefault(ev, {}).setdefault(t.variant.without(SWEEP_AXIS), {}).setdefault(x, []).append(y)
    if not per_ev:
        return None, {}
    ev = min(per_ev, key=lambda e: (-len({x for pts in per_ev[e].values() for x in pts}), _eval_order(e)))
    return ev, {line: sorted(((x, mean_interval(v)) for x, v in pts.items()), key=lambda p: p[0])
                for line, pts in per_ev[ev].items()}


@_styled
def lambda_sweep(res: Results, path: Path) -> Optional[Path]:
    lines = sweep_lines(res)
    if not lines:
        return None
    ev, seg = sweep_segmentation(res)
    n_panels = 2 if seg else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.8), squeeze=False)
    rank = method_order(res)
    keys = sorted(set(lines) | set(seg), key=lambda v: v.sort_key(rank))
    colors = dict(zip(keys, _colors(len(keys))))
    all_l = sorted({_sweep_value(g.variant) for gs in lines.values() for g in gs}
                   | {x for pts in seg.values() for x, _ in pts})
    for key in keys:
        col, label = colors[key], key.label
        gs = lines.get(key, [])
        lam = [_sweep_value(g.variant) for g in gs]
        ebs = [errorbar(g.values("knn_acc")) for g in gs]
        ok = [i for i, eb in enumerate(ebs) if eb is not None]
        if ok:
            axes[0, 0].errorbar([lam[i] for i in ok], [ebs[i][0] for i in ok], yerr=_yerr(ebs[i][1] for i in ok),
                                marker="o", capsize=3, color=col, label=label)
        pts = seg.get(key)
        if pts:
            axes[0, 1].errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=_yerr(p[1].half_width for p in pts),
                                marker="s", capsize=3, color=col, label=label)
    sym = axis_header(SWEEP_AXIS)
    methods = ", ".join(dict.fromkeys(k.method_label for k in lines))
    titles = [f"{methods} {sym} sweep: k-NN accuracy", f"{methods} {sym} sweep: {ev} segmentation mIoU"]
    ylabels = ["k-NN accuracy (frozen features)", f"{ev} mIoU (%)"]
    for i in range(n_panels):
        ax = axes[0, i]
        scale = "log"
        if min(all_l) > 0:
            ax.set_xscale("log")
        else:
            scale = "symlog"
            pos = [v for v in all_l if v > 0]
            ax.set_xscale("symlog", linthresh=min(pos) if pos else 1e-3)
        ax.set_xticks(all_l)
        ax.set_xticklabels([f"{v:g}" for v in all_l], rotation=30)
        ax.minorticks_off()
        ax.set_xlabel(f"{sym} ({SWEEP_AXIS}, {scale} scale)")
        ax.set_ylabel(ylabels[i])
        ax.set_title(titles[i])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="pretraining variant", loc="best")
    fig.suptitle("Error bars: 95% t interval over seeds (none: one seed)", fontsize=8, y=0.01, va="bottom", color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path)


# ----------------------------------------------------------------------------- evaluation bars
def _bar_label(g, multi: bool) -> str:
    return (f"{g.dataset or 'unknown'} · " if multi else "") + f"{g.label} · {g.head}/{g.fusion}"


def bar_points(res: Results, key: str) -> list[tuple[str, str, float, Optional[float]]]:
    """(evaluation, bar label, mean, 95% t half-width or None for one seed) of every segmentation row with a
    finite `key`: what `evaluation_bars` draws (labels name the dataset when there are several)."""
    groups = segment_groups(res)
    multi = len({g.dataset for g in groups}) > 1
    out = []
    for g in groups:
        eb = errorbar(t.metrics.get(key) for t in g.trials)
        if eb is not None:
            out.append((g.evaluation, _bar_label(g, multi), *eb))
    return out


@_styled
def evaluation_bars(res: Results, path: Path) -> Optional[Path]:
    """mIoU and aAcc per evaluation, one bar per row (mean over seeds) with its 95% t interval (`bar_points`)."""
    groups = segment_groups(res)
    if not groups:
        return None
    evals = sorted({g.evaluation for g in groups}, key=_eval_order)
    labels = sorted({lab for key in ("mIoU", "aAcc") for _, lab, _, _ in bar_points(res, key)})
    colors = dict(zip(labels, _colors(len(labels))))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("mIoU", "aAcc")):
        points = bar_points(res, key)
        for xi, ev in enumerate(evals):
            gs = [p for p in points if p[0] == ev]
            width = 0.8 / max(len(gs), 1)
            for j, (_, lab, mean, half) in enumerate(gs):
                x = xi - 0.4 + width * (j + 0.5)
                ax.bar(x, mean, width * 0.9, yerr=half, capsize=3, color=colors[lab], edgecolor="0.2",
                       linewidth=0.5, label=lab)
                ax.annotate(f"{mean:.1f}", (x, mean + (half or 0)), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(evals)))
        ax.set_xticklabels(evals)
        ax.set_xlabel("evaluation")
        ax.set_ylabel(f"{key} (%)")
        ax.set_title(f"Segmentation {key} per evaluation (mean, 95% t interval over seeds)")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1) * 1.08)
        ax.grid(axis="x", visible=False)
    handles, labs = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labs, handles))
    fig.tight_layout()
    fig.legend(list(uniq.values()), list(uniq.keys()), loc="upper center", ncol=min(2, len(uniq)),
               title="pretraining · head/fusion", bbox_to_anchor=(0.5, 0.0), frameon=False)
    return _save(fig, path)


# ----------------------------------------------------------------------------- training curves
@_styled
def _plot_curves(panels: list[tuple[str, str, list]], title: str, path: Path) -> Optional[Path]:
    """panels: (title, ylabel, [(x, y, xlabel, color, linestyle, label)])"""
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    handles: dict = {}
    for ax, (ptitle, ylabel, curves) in zip(axes.flat, panels):
        xl = set()
        for x, y, xlabel, color, ls, label in curves:
            (h,) = ax.plot(x, y, color=color, linestyle=ls, marker="." if len(x) < 30 else None, label=label)
            handles.setdefault(label, h)
            xl.add(xlabel)
        ax.set_title(ptitle)
        ax.set_xlabel(" / ".join(sorted(xl)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if "loss" in ptitle.lower():
            ys = np.concatenate([c[1] for c in curves])
            if ys.size and np.nanmin(ys) > 0 and np.nanmax(ys) / max(np.nanmin(ys), 1e-12) > 50:
                ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(3, len(handles)), frameon=False, title="variant (line style = seed)")
    return _save(fig, path)


def pretrain_curves(res: Results, path: Path) -> Optional[Path]:
    trials = [t for t in res.stage(PRETRAIN, ok_only=False) if t.history_path]
    if not trials:
        return None
    rank = method_order(res)
    variants = sorted({pretrain_variant(t).label for t in trials})
    colors = dict(zip(variants, _colors(len(variants))))
    seeds = sorted({t.get("seed") for t in trials}, key=str)
    method_label = {pretrain_variant(t).method: pretrain_variant(t).method_label for t in trials}
    methods = sorted(method_label, key=lambda m: (rank.get(m, len(rank)), m))
    panels: dict[str, tuple[str, str, list]] = {}
    order = [f"loss:{m}" for m in methods] + ["knn", "cc_diag", "cc_off"]
    for m in methods:  # one loss panel per method: their losses have unrelated scales
        panels[f"loss:{m}"] = (f"Training loss ({method_label[m]})", "loss", [])
    panels["knn"] = ("k-NN accuracy", "k-NN accuracy", [])
    panels["cc_diag"] = ("Cross-correlation: mean diagonal", "mean C_ii (→ 1)", [])
    panels["cc_off"] = ("Cross-correlation: off-diagonal RMS", "RMS C_ij, i≠j (→ 0)", [])
    for t in trials:
        df = read_history(t)
        if df is None:
            continue
        lab = pretrain_variant(t).label
        style = (colors[lab], _seed_style(t, seeds), lab)
        cols = {f"loss:{pretrain_variant(t).method}": loss_column(df), "knn": knn_column(df),
                "cc_diag": find_column(df, ["diag"], exclude=["off"]),
                "cc_off": find_column(df, ["off"], prefer=["rms", "diag"])}
        for k, col in cols.items():
            if col is not None and k in panels:
                x, y, xl = series(df, col)
                if len(x):
                    panels[k][2].append((x, y, xl, *style))
    return _plot_curves([panels[k] for k in order], "Pretraining curves (from each trial's history.csv)", path)


def segment_curves(res: Results, path: Path) -> Optional[Path]:
    trials = [t for t in res.stage(SEGMENT, ok_only=False) if t.history_path]
    if not trials:
        return None
    from analysis.results import segment_variant

    def lab(t: Trial) -> str:
        return f"{t.get('evaluation') or 'custom'}: {segment_variant(t)}"

    labels = sorted({lab(t) for t in trials}, key=lambda s: (_eval_order(s.split(":")[0]), s))
    colors = dict(zip(labels, _colors(len(labels))))
    seeds = sorted({t.get("seed") for t in trials}, key=str)
    panels = {"miou": ("Validation mIoU", "mIoU (%)", []), "loss": ("Training loss", "loss", []),
              "vloss": ("Validation loss", "loss", [])}
    for t in trials:
        df = read_history(t)
        if df is None:
            continue
        style = (colors[lab(t)], _seed_style(t, seeds), lab(t))
        cols = {"miou": miou_column(df), "loss": loss_column(df), "vloss": find_column(df, ["val", "loss"])}
        for k, col in cols.items():
            if col is not None:
                x, y, xl = series(df, col)
                if len(x):
                    panels[k][2].append((x, y, xl, *style))
    return _plot_curves(list(panels.values()), "Segmentation curves (from each trial's history.csv)", path)


# ----------------------------------------------------------------------------- emerging properties
def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (average ranks for ties), None for fewer than 3 points or a constant side."""
    if len(x) < 3:
        return None
    import pandas as pd

    rx, ry = pd.Series(list(x)).rank().to_numpy(), pd.Series(list(y)).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


@_styled
def emerging_properties(res: Results, path: Path) -> Optional[Path]:
    """One panel per measure of a pretraining (the registry's "emerging" columns) that some finished
    segmentation trial can be paired with: the measure of the pretraining trial (x) against the mIoU of
    each segmentation trial built on it (y), one colour per evaluation, the Spearman rank correlation
    per evaluation in the legend (3 points or more); a pretraining that collapsed is drawn as an x."""
    panels = [(key, header, emerging_points(res, key)) for key, header, _, _ in emerging_cols()]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    evals = sorted({ev for _, _, pts in panels for ev, *_ in pts}, key=_eval_order)
    colors = dict(zip(evals, _colors(len(evals))))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, header, pts) in zip(axes.flat, panels):
        for ev in evals:
            mine = [(x, y, c) for e, x, y, c in pts if e == ev]
            if not mine:
                continue
            rho = spearman([x for x, _, _ in mine], [y for _, y, _ in mine])
            label = f"{ev} (n={len(mine)}" + (f", ρ={rho:+.2f})" if rho is not None else ")")
            ok = [(x, y) for x, y, c in mine if not c]
            bad = [(x, y) for x, y, c in mine if c]
            if ok:
                ax.scatter(*zip(*ok), color=colors[ev], marker="o", s=28, edgecolor="0.2", linewidth=0.5,
                           label=label)
            if bad:
                ax.scatter(*zip(*bad), color=colors[ev], marker="x", s=40, label=None if ok else label)
        ax.set_xlabel(f"{header} (pretraining)")
        ax.set_ylabel("segmentation mIoU (%)")
        ax.set_title(f"mIoU vs {header}")
        ax.legend(loc="best", frameon=False, title="evaluation")
    fig.suptitle("Which pretraining measure predicts segmentation? (one point per segmentation trial; "
                 "x: collapsed pretraining)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


# ----------------------------------------------------------------------------- contact sheets
def _font(size: int):
    from PIL import ImageFont

    try:  # DejaVu ships with matplotlib and has λ, ±, ...
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except Exception:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def contact_sheet(items: Sequence[tuple[Path, str]], title: str, path: Path, ncols: int = 4,
                  max_items: int = 24, tile: int = 256) -> Optional[Path]:
    """Tile PNGs (path, caption) into one PNG (Pillow; unreadable images are skipped)."""
    from PIL import Image, ImageDraw

    imgs = []
    for p, cap in items[:max_items]:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = min(tile / w, tile / h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
                imgs.append((im.resize(size, resample), cap))
        except Exception:
            continue
    if not imgs:
        return None
    ncols = min(ncols, len(imgs))
    nrows = math.ceil(len(imgs) / ncols)
    pad, cap_h, title_h = 12, 50, 40
    W = ncols * (tile + pad) + pad
    H = title_h + nrows * (tile + cap_h + pad) + pad
    sheet = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(sheet)
    extra = f" (first {max_items} of {len(items)})" if len(items) > max_items else ""
    draw.text((W // 2, title_h // 2), title + extra, fill="black", font=_font(18), anchor="mm")
    small = _font(11)
    for k, (im, cap) in enumerate(imgs):
        r, c = divmod(k, ncols)
        x0 = pad + c * (tile + pad)
        y0 = title_h + r * (tile + cap_h + pad)
        lines = cap.split("\n")[:3]
        for j, line in enumerate(lines):
            while len(line) > 8 and draw.textlength(line, font=small) > tile:
                line = line[:-4] + "…"
            draw.text((x0 + tile // 2, y0 + 2 + j * 15), line, fill="black", font=small, anchor="ma")
        sheet.paste(im, (x0 + (tile - im.size[0]) // 2, y0 + cap_h + (tile - im.size[1]) // 2))
    return atomic.write_file(path, lambda tmp: sheet.save(tmp, format="PNG", optimize=False), ".png")
