"""Turn a grid results folder into `report.md`, `tables/` (CSV, markdown, LaTeX) and `figures/` (PNG).

    python analysis/report.py RESULTS_DIR [--out DIR]

or, from Python, `analysis.report.build_report(results_dir, out_dir=None) -> Path` (to report.md).

Reads only RESULTS_DIR (`summary.json`, `trials/*/{metrics.json,config.json,history.csv,figures/*.png}`;
a missing summary.json is tolerated by scanning trials/; a single run folder (metrics.json /
config.json at its top, as experiments/pretrain.py / segment.py write it) is a one-trial report; a
folder with none of these is refused in one line). Works on partial results: failed, skipped,
pending or unfinished trials are listed as missing, never a crash; a null / NaN / inf headline value
is a blank ("n/a") cell with a note naming the trials, and a figure that cannot be drawn from the
values is left out with a note. Every file is written atomically
(temporary file + os.replace), report.md last.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import guard  # noqa: E402
from core.errors import TwinsegError  # noqa: E402

from analysis import atomic  # noqa: E402
from analysis.results import Results, Trial, load_results  # noqa: E402
from core.stages import PRETRAIN, SEGMENT, stages  # noqa: E402

# pandas / matplotlib are imported only once the folder is known to be a results folder, so a bad
# RESULTS_DIR fails in a fraction of a second: analysis.tables (T) and analysis.figures (F).
T = F = None  # type: ignore[assignment]


def _heavy_imports() -> None:
    global T, F
    if T is None or F is None:
        from analysis import figures as _F
        from analysis import tables as _T

        T, F = _T, _F

GALLERIES = (  # (figure prefix in trials/*/figures, title, output name, stage names)
    ("crosscorr_", "Cross-correlation matrices (last snapshot of each pretraining trial)", "gallery_crosscorr.png", (PRETRAIN.name,)),
    ("attention_", "Attention maps (last snapshot of each trial)", "gallery_attention.png", tuple(stages())),
    ("erf_", "Effective receptive fields", "gallery_erf.png", tuple(stages())),
    ("predictions_", "Prediction overlays (image | truth | prediction)", "gallery_predictions.png", (SEGMENT.name,)),
)


def _link(target: Path, base: Path) -> str:
    rel = os.path.relpath(Path(target).resolve(), Path(base).resolve()).replace(os.sep, "/")
    return quote(rel, safe="/=,+-_.~@:")


def _trial_caption(t: Trial) -> str:
    return f"{t.id}\n{T.describe_trial(t)} s{t.get('seed', '?')}"


def _missing_line(t: Trial) -> str:
    reason = f": {t.reason}" if t.reason else ""
    return f"{t.id} ({t.status}{reason})"


def status_section(res: Results) -> list[str]:
    n = len(res.trials)
    missing = [t for t in res.trials if not t.ok]
    lines = ["## Status", ""]
    by_stage = {}
    for t in res.trials:
        by_stage.setdefault(t.stage, {}).setdefault(t.status, 0)
        by_stage[t.stage][t.status] += 1
    if n == 0:
        lines.append("The results folder lists no trial yet (the grid has not started any).")
    else:
        lines.append(f"{n - len(missing)} of {n} trials finished"
                     + (" (all results present)." if not missing else "."))
    lines.append("")
    for stage, counts in sorted(by_stage.items()):
        lines.append(f"- {stage}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    lines.append("")
    if missing:
        lines.append(f"**{len(missing)} of {n} trials missing:** " + "; ".join(_missing_line(t) for t in missing) + ".")
        lines.append("")
        lines.append("Tables and figures below are computed from the finished trials only; "
                     "a mean over fewer seeds than planned shows its seed count.")
        lines.append("")
    for note in res.notes + missing_value_notes(res):
        lines.append(f"- note: {note}")
    if res.notes or missing_value_notes(res):
        lines.append("")
    return lines


def missing_value_notes(res: Results) -> list[str]:
    """One note per (stage, headline metric: core/metrics/registry.py `headline` / `required`) naming the
    finished trials whose value is null or non-finite (absent too, for a `required` one); their table cells
    stay blank ("n/a")."""
    from core.metrics.registry import headline

    out = []
    for stage in stages():
        for spec in headline(stage):
            key = spec.key
            bad = [t for t in res.stage(stage) if key in t.metrics or spec.required]
            bad = [t for t in bad if not _is_finite(t.metrics.get(key))]
            if bad:
                kinds = sorted({"missing" if t.metrics.get(key) is None else "non-finite" for t in bad})
                ids = ", ".join(t.id for t in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
                out.append(f"{key} is n/a ({' / '.join(kinds)} in metrics.json) for {len(bad)} finished {stage} "
                           f"trial(s): {ids}; their cells are blank and they are left out of means and figures")
    return out


def _is_finite(v) -> bool:
    try:
        return not isinstance(v, bool) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _table_block(t, out: Path, tables_dir: Path) -> list[str]:
    if not t:
        return []
    links = " · ".join(f"[{ext.upper()}]({_link(tables_dir / f'{t.name}.{ext}', out)})" for ext in ("csv", "md", "tex"))
    lines = [f"**{t.title}** ({links})", "", t.to_markdown(), ""]
    if t.note:
        lines += [f"_{t.note}_", ""]
    return lines


def _figure_block(path: Optional[Path], alt: str, out: Path, caption: str = "") -> list[str]:
    if path is None:
        return [f"_{alt}: nothing to plot yet._", ""]
    lines = [f"![{alt}]({_link(path, out)})", ""]
    if caption:
        lines += [f"_{caption}_", ""]
    return lines


def differences_line() -> str:
    """The caption of the segmentation differences tables: what is compared (the baselines as declared in
    core/evaluations.py) and how the intervals are computed."""
    from analysis.results import axis_header
    from core.evaluations import EVALUATIONS

    base = [f"{ev} against {spec['baseline']} ({spec.get('baseline_reason') or 'declared baseline'})"
            for ev, spec in EVALUATIONS.items() if spec.get("baseline")]
    sym = axis_header(T.SWEEP_AXIS)
    return ("The differences table gives each row against the control beside it, each " + sym + " against its "
            "method's default" + ("".join(f", {b}" for b in base)) + ": the mean difference over seeds with its "
            "95% interval, paired by seed where both rows share two or more seeds, else Welch's; 'excludes 0' marks "
            "a difference the seeds resolve; one seed: no interval.")


SKIPPED_FIGURES: list[str] = []  # "<figure>: <why>" of the figures the current report could not draw


def _write_figure(fn, res: Results, path: Path) -> Optional[Path]:
    """Draw one figure; a figure that cannot be drawn from these values (all missing / non-finite, an
    odd folder) is left out with a note in the report instead of failing the whole report."""
    try:
        got = fn(res, path)
    except Exception as e:  # noqa: BLE001 - one figure never costs the report
        got = None
        SKIPPED_FIGURES.append(f"{path.name}: {type(e).__name__}: {' '.join(str(e).split())[:160].rstrip('.')}")
    if got is None and path.exists():  # stale figure from an earlier report
        path.unlink()
    return got


def protocol_lines(res) -> list[str]:
    """How the segmentation numbers were measured, from the runs' own `eval_protocol` / `val_pixels`
    (one line per distinct protocol); runs written before these keys existed are counted as unknown."""
    seen: dict[str, list[int]] = {}
    unknown = 0
    for t in res.stage(SEGMENT):
        p = t.metrics.get("eval_protocol")
        if not isinstance(p, dict):
            unknown += 1
            continue
        desc = (f"split {p.get('split', '?')} ({p.get('images', '?')} images), scored at {p.get('resolution', '?')} "
                f"resolution after a keep-ratio resize to short side {p.get('eval_scale', '?')}, "
                f"{p.get('inference', '?')} inference")
        if p.get("inference") == "slide":
            desc += f" (crop {p.get('slide_crop', '?')}, stride {p.get('slide_stride', '?')})"
        seen.setdefault(desc, []).append(int(t.metrics.get("val_pixels") or 0))
    out = [f"{d}; 255 ignored; {max(px):,} labelled pixels scored ({len(px)} runs)." for d, px in seen.items()]
    if unknown:
        out.append(f"{unknown} run(s) written before the protocol was recorded (no eval_protocol in metrics.json).")
    return out


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md, tables/ and figures/ for a results folder; return the path of report.md."""
    res = load_results(results_dir)
    _heavy_imports()
    out = Path(out_dir) if out_dir is not None else res.root
    if out.exists() and not out.is_dir():
        raise TwinsegError(f"--out {out} is a file, not a folder; pass --out DIR (report.md, tables/ and figures/ "
                           "go in it)")
    try:
        return _build(res, out)
    except PermissionError as e:
        raise TwinsegError(f"cannot write the report under {out} ({e.strerror}); pass --out DIR to a writable folder") from None
    except (FileExistsError, NotADirectoryError) as e:  # a file where a folder of the report must go
        raise TwinsegError(f"cannot write the report under {out}: {e.filename} is a file, not a folder; pass --out "
                           "DIR to a folder") from None


def _build(res: Results, out: Path) -> Path:
    SKIPPED_FIGURES.clear()
    out.mkdir(parents=True, exist_ok=True)
    tables_dir, figs_dir = out / "tables", out / "figures"

    # ---------------------------------------------------------------- tables
    sections = [(ds, tabs, T.per_class_table(res, ds)) for ds, tabs in T.segmentation_sections(res)]
    seg_tables = [t for _, tabs, pc in sections for t in [*tabs, pc] if t]
    pre_table = T.pretraining_table(res)
    cmp_table = T.method_comparison_table(res)
    emerging_table = T.emerging_table(res)
    trials_table = T.trials_table(res)
    all_tables = [t for t in [*seg_tables, pre_table, cmp_table, emerging_table, trials_table] if t]
    for t in all_tables:
        t.write(tables_dir)

    # ---------------------------------------------------------------- figures
    fig_bars = _write_figure(F.evaluation_bars, res, figs_dir / "evaluations_bar.png")
    fig_sweep = _write_figure(F.lambda_sweep, res, figs_dir / "lambda_sweep.png")
    fig_pc = _write_figure(F.pretrain_curves, res, figs_dir / "curves_pretrain.png")
    fig_sc = _write_figure(F.segment_curves, res, figs_dir / "curves_segment.png")
    fig_em = _write_figure(F.emerging_properties, res, figs_dir / "emerging_properties.png")
    galleries = []
    for prefix, title, name, stages in GALLERIES:
        items = []  # (trial, last png, all pngs)
        for t in res.trials:
            if t.stage in stages or t.stage == "unknown":
                pngs = t.figures(prefix)
                if pngs:
                    items.append((t, pngs[-1], pngs))
        sheet = None
        if items:
            sheet = F.contact_sheet([(p, f"{_trial_caption(t)}\n{p.stem}") for t, p, _ in items], title,
                                    figs_dir / name)
        elif (figs_dir / name).exists():
            (figs_dir / name).unlink()
        galleries.append((title, sheet, items))

    # ---------------------------------------------------------------- report.md
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = [f"# twinseg report: {res.grid}", ""]
    L.append(f"Results folder: `{res.root}`" + (f" · grid created {res.created}" if res.created else "")
             + f" · report generated {now}.")
    L.append("")
    L += status_section(res)

    L += ["## Segmentation (stage 2)", ""]
    if seg_tables:
        L.append("The study's evaluations: " + "; ".join(f"{k} = {T.eval_short(k)}" for k in T.eval_order())
                 + ". Values are percent, mean ± std over seeds (std blank for one seed); the pretraining variant is "
                   "the stage-1 run whose checkpoint the trial used; a control (a trial that used no stage-1 run: "
                   "random init, ImageNet or published weights) sits after the rows it controls.")
        L.append("")
        L.append(differences_line())
        L.append("")
        L += [f"Protocol: {line}" for line in protocol_lines(res)] + [""]
        for ds, tabs, per_class in sections:
            seg = {t.name.removesuffix(f"_{ds or 'unknown'}") if len(sections) > 1 else t.name: t for t in tabs}
            if len(sections) > 1:
                L += [f"### Dataset: {ds or 'unknown'}", ""]
            for name in ("segmentation_miou", "segmentation_aacc", "segmentation_differences", "segmentation_runs"):
                L += _table_block(seg.get(name), out, tables_dir)
            L += _table_block(per_class, out, tables_dir)
        present = {g.evaluation for g in T.segment_groups(res)}
        absent = [e for e in T.eval_order() if e not in present]
        if absent:
            L += [f"_No finished trial for: {', '.join(absent)}._", ""]
    else:
        L += ["_No finished segmentation trial yet._", ""]
    L += _figure_block(fig_bars, "Evaluations: mIoU and aAcc", out,
                       "Bars: mean over seeds; error bars: 95% t interval over seeds (none for a single seed).")
    L += _figure_block(fig_sc, "Segmentation training curves", out)

    L += ["## Pretraining (stage 1)", ""]
    if pre_table:
        L.append("Rows: one per pretraining variant (the trials' grid labels, seeds pooled). k-NN: weighted cosine "
                 "k-NN on frozen pooled features (labels from the masks), after training and at initialisation; "
                 "C: the cross-correlation matrix of the methods that report it (blank for the others); "
                 "device-hours = device_seconds / 3600.")
        L.append("")
        L += _table_block(pre_table, out, tables_dir)
        if cmp_table:
            L += ["### SSL methods compared at equal budget", ""]
            L += _table_block(cmp_table, out, tables_dir)
        else:
            L += ["_No backbone and init has finished runs of two or more SSL methods: no method comparison._", ""]
    else:
        L += ["_No finished pretraining trial yet._", ""]
    L += _figure_block(fig_sweep, "Lambda sweep", out, "k-NN accuracy (and the segmentation mIoU of the evaluation "
                       "that covers the most λ values, when present) against the λ label of the variants that "
                       "have one, one line per method, backbone and init; error bars: 95% t interval over seeds (none for a "
                       "single seed).")
    L += _figure_block(fig_pc, "Pretraining training curves", out)
    if emerging_table:
        L += ["### Emerging properties", ""]
        L += _table_block(emerging_table, out, tables_dir)
        L += _figure_block(fig_em, "Emerging properties vs segmentation", out,
                           "Each pretraining measure (x) against the mIoU of every segmentation trial built on that "
                           "pretraining (y, the stage-2 `from` link), one colour per evaluation; ρ: Spearman rank "
                           "correlation within an evaluation; x markers: the pretraining collapsed.")

    L += ["## Diagnostics", ""]
    for title, sheet, items in galleries:
        L += [f"### {title}", ""]
        if not items:
            L += ["_None found in the trials' figures/ folders._", ""]
            continue
        if sheet is not None:
            L += [f"![{title}]({_link(sheet, out)})", ""]
        for t, last, pngs in items:
            more = f" ({len(pngs)} snapshots: " + ", ".join(f"[{p.stem}]({_link(p, out)})" for p in pngs[:-1]) + ")" if len(pngs) > 1 else ""
            L.append(f"- `{t.id}`: [{last.name}]({_link(last, out)}){more}")
        L.append("")

    if SKIPPED_FIGURES:
        L += ["_Figures left out (could not be drawn from these values): " + "; ".join(SKIPPED_FIGURES) + "._", ""]
    L += ["## Files", ""]
    for t in all_tables:
        L.append(f"- {t.title}: " + ", ".join(f"[{t.name}.{e}]({_link(tables_dir / f'{t.name}.{e}', out)})"
                                             for e in ("csv", "md", "tex")))
    L.append("")
    return atomic.write_text(out / "report.md", "\n".join(L))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="analysis/report.py", description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", metavar="RESULTS_DIR", help="a grid results folder (results/<grid>-<timestamp>/)")
    ap.add_argument("--out", metavar="DIR", default=None, help="write report.md, tables/, figures/ here (default: RESULTS_DIR)")
    args = ap.parse_args(argv)
    if "://" in args.results_dir and args.out is None:  # an object store: built in a local copy, uploaded
        from core.storage import Storage, build_on_storage

        path = build_on_storage(Storage(args.results_dir), build_report)
    else:
        path = build_report(args.results_dir, args.out)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main)())
