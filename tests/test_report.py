"""analysis/report.py on fake-but-format-exact results folders (tests/fixtures_results.py)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_results import build_results  # noqa: E402

from analysis.report import build_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VARIANT = {
    ("barlow_twins", "vit_nano_patch8", 0.0051): "BT vit_nano_patch8 init=random λ=0.0051",
    ("barlow_twins", "vit_nano_patch8", 0.05): "BT vit_nano_patch8 init=random λ=0.05",
    ("barlow_twins", "resnet_tiny", 0.0051): "BT resnet_tiny init=random λ=0.0051",
    ("dino", "vit_nano_patch8", None): "DINO vit_nano_patch8 init=random",
}


def _variant_of(pre_metrics: dict) -> str:
    lam = pre_metrics["lambd"] if pre_metrics["method"] == "barlow_twins" else None
    return VARIANT[(pre_metrics["method"], pre_metrics["backbone"], lam)]


def _mean_std(vals):
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _expected_seg(built, key: str) -> dict:
    """(evaluation, variant) -> list of metric values over finished seeds."""
    out: dict = {}
    for tid, t in built.trials.items():
        if t["stage"] != "segment" or t["status"] != "done" or not t["has_metrics_file"]:
            continue
        pre = built.trials[t["depends_on"][0]]["metrics"]
        out.setdefault((t["metrics"]["evaluation"], _variant_of(pre)), []).append(t["metrics"][key])
    return out


def _md_table(path: Path) -> list[list[str]]:
    rows = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in rows if not set(ln) <= set("|:- ")]


def _links(report: Path) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", report.read_text())


def _assert_links_resolve(report: Path) -> int:
    links = _links(report)
    assert links
    for ln in links:
        assert (report.parent / unquote(ln)).is_file(), f"broken link in report.md: {ln}"
    return len(links)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    built = build_results(tmp_path_factory.mktemp("res") / "smoke-20250101-000000")
    report = build_report(built.root)
    return built, report


# ----------------------------------------------------------------------------- full grid
def test_segmentation_tables_mean_std_and_best(full):
    built, report = full
    assert report == built.root / "report.md" and report.is_file()
    tables = built.root / "tables"
    for key, name in (("mIoU", "segmentation_miou"), ("aAcc", "segmentation_aacc")):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"{name}.{ext}").is_file()
        df = pd.read_csv(tables / f"{name}.csv").set_index("pretraining")
        exp = _expected_seg(built, key)
        assert {e for e, _ in exp} == {"E1", "E2", "E3", "E4", "E5"}
        assert set(df.index) == set(VARIANT.values())
        for (ev, var), vals in exp.items():
            m, s = _mean_std(vals)
            assert len(vals) == 2
            assert df.loc[var, f"{ev}_mean"] == pytest.approx(m)
            assert df.loc[var, f"{ev}_std"] == pytest.approx(s)
            assert df.loc[var, f"{ev}_n"] == 2
        # best per column in bold (markdown) and \textbf (LaTeX): E2 has two variants (two lambdas)
        md = _md_table(tables / f"{name}.md")
        header, body = md[0], md[1:]
        c = header.index("E2")
        bold_rows = [r[0] for r in body if r[c].startswith("**")]
        e2 = {var: _mean_std(v)[0] for (ev, var), v in exp.items() if ev == "E2"}
        assert bold_rows == [max(e2, key=e2.get)]
        m, s = _mean_std(exp[("E2", bold_rows[0])])
        assert body[[r[0] for r in body].index(bold_rows[0])][c] == f"**{m:.2f} ± {s:.2f}**"
        assert "\\textbf{" in (tables / f"{name}.tex").read_text()
        assert "\\begin{tabular}" in (tables / f"{name}.tex").read_text()


def test_segmentation_runs_and_per_class(full):
    built, _ = full
    runs = pd.read_csv(built.root / "tables" / "segmentation_runs.csv")
    assert list(runs["evaluation"].unique()) == ["E1", "E2", "E3", "E4", "E5"]
    assert len(runs) == 6 and (runs["n_seeds"] == 2).all()
    e4 = runs[runs["evaluation"] == "E4"].iloc[0]
    assert (e4["head"], e4["fusion"]) == ("setr_pup", "affinity")
    # per-class IoU of the best run of each evaluation
    pc = pd.read_csv(built.root / "tables" / "per_class_iou.csv").set_index("class")
    for ev in ("E1", "E2", "E3", "E4", "E5"):
        cands = [t for t in built.trials.values() if t["stage"] == "segment" and t["metrics"]["evaluation"] == ev]
        best = max(cands, key=lambda t: t["metrics"]["mIoU"])
        m = best["metrics"]
        for name, v in zip(m["class_names"], m["IoU"]):
            assert pc.loc[name, ev] == pytest.approx(v)
        assert pc.loc["mIoU", ev] == pytest.approx(m["mIoU"])
        assert best["id"] in (built.root / "tables" / "per_class_iou.md").read_text()


def test_pretraining_and_bt_vs_dino_tables(full):
    built, _ = full
    df = pd.read_csv(built.root / "tables" / "pretraining.csv")
    assert len(df) == 4
    for _, row in df.iterrows():
        lam = None if row["method"] == "dino" else row["lambd"]
        trials = [t["metrics"] for t in built.trials.values() if t["stage"] == "pretrain"
                  and t["metrics"]["method"] == row["method"] and t["metrics"]["backbone"] == row["backbone"]
                  and (lam is None or math.isclose(t["metrics"]["lambd"], lam))]
        assert row["n_seeds"] == len(trials) == 2
        for key in ("knn_acc", "knn_acc_init", "linear_probe_acc", "dense_rank", "dense_local_var", "final_loss",
                    "wall_time_s", "images_per_s", "peak_mem_mb"):
            m, s = _mean_std([t[key] for t in trials])
            assert row[f"{key}_mean"] == pytest.approx(m), key
            assert row[f"{key}_std"] == pytest.approx(s), key
        m, _ = _mean_std([t["device_seconds"] / 3600 for t in trials])
        assert row["device_hours_mean"] == pytest.approx(m)
        if row["method"] == "dino":
            assert pd.isna(row["lambd"]) and pd.isna(row["cc_diag_mean_mean"])
        else:
            assert row["cc_diag_mean_mean"] == pytest.approx(_mean_std([t["cc_diag_mean"] for t in trials])[0])
    bvd = pd.read_csv(built.root / "tables" / "bt_vs_dino.csv")
    assert set(bvd["backbone"]) == {"vit_nano_patch8"}  # resnet_tiny has no DINO run: not paired
    assert set(bvd["method"]) == {"barlow_twins", "dino"}
    dino = bvd[bvd["method"] == "dino"].iloc[0]
    trials = [t["metrics"] for t in built.trials.values() if t["stage"] == "pretrain" and t["metrics"]["method"] == "dino"]
    assert dino["knn_per_device_hour_mean"] == pytest.approx(
        np.mean([t["knn_acc"] / (t["device_seconds"] / 3600) for t in trials]))
    assert dino["cost_vs_cheapest"] > 1.0
    # DINO is more expensive: at the BT budget it has done fewer epochs -> lower k-NN than its final one
    assert dino["knn_at_equal_budget_mean"] < dino["knn_acc_mean"]
    bt_cheapest = bvd[bvd["cost_vs_cheapest"] == bvd["cost_vs_cheapest"].min()].iloc[0]
    assert bt_cheapest["method"] == "barlow_twins"


def test_figures_are_pngs_and_links_resolve(full):
    built, report = full
    figs = built.root / "figures"
    expected = ["evaluations_bar.png", "lambda_sweep.png", "curves_pretrain.png", "curves_segment.png",
                "gallery_crosscorr.png", "gallery_attention.png", "gallery_erf.png", "gallery_predictions.png"]
    import matplotlib.pyplot as plt

    for name in expected:
        p = figs / name
        assert p.is_file(), name
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = plt.imread(str(p))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    n = _assert_links_resolve(report)
    text = report.read_text()
    for name in expected:
        assert f"figures/{name}" in text
    # the last cross-correlation snapshot (natural order: epoch010 after epoch002) of each BT trial is linked
    assert "crosscorr_epoch010.png" in text
    assert n > 30
    assert not list(built.root.rglob("*.tmp*")), "temporary files left behind"
    assert "all results present" in text


# ----------------------------------------------------------------------------- partial results
def test_partial_results_list_what_is_missing(tmp_path):
    built = build_results(tmp_path / "partial", partial=True)
    # an unreadable metrics.json and a garbage history.csv must not crash the report either
    e2 = built.root / "trials" / "segment_E2_vit_nano_patch8_l0.05_s1"
    (e2 / "metrics.json").write_text("{not json")
    (built.root / "trials" / "pretrain_bt_vit_nano_patch8_l0.05_s0" / "history.csv").write_bytes(b"\x00\x01garbage")
    report = build_report(built.root)
    text = report.read_text()
    missing = [i for i, t in built.trials.items() if t["status"] != "done" or not t["has_metrics_file"]]
    assert len(missing) == 4
    assert f"**5 of {len(built.trials)} trials missing:**" in text
    assert "pretrain_dino_vit_nano_patch8_s1 (failed: CUDA out of memory at epoch 2 (RuntimeError))" in text
    assert "segment_E5_vit_nano_patch8_dino_s1 (skipped: dependency pretrain_dino_vit_nano_patch8_s1 failed)" in text
    assert "segment_E4_vit_nano_patch8_l0.0051_s1 (pending)" in text
    assert "segment_E3_vit_nano_patch8_l0.0051_s1 (incomplete: no metrics.json)" in text
    assert "segment_E2_vit_nano_patch8_l0.05_s1 (incomplete: metrics.json unreadable)" in text
    # the tables hold what finished: E5 / E4 / E3 now have one seed, so no std
    df = pd.read_csv(built.root / "tables" / "segmentation_miou.csv").set_index("pretraining")
    assert df.loc[VARIANT[("dino", "vit_nano_patch8", None)], "E5_n"] == 1
    assert pd.isna(df.loc[VARIANT[("dino", "vit_nano_patch8", None)], "E5_std"])
    assert df.loc[VARIANT[("barlow_twins", "vit_nano_patch8", 0.0051)], "E2_n"] == 2
    trials = pd.read_csv(built.root / "tables" / "trials.csv")
    assert len(trials) == len(built.trials)
    assert set(trials["status"]) == {"done", "failed", "skipped", "pending", "incomplete"}
    _assert_links_resolve(report)


def test_single_seed_has_blank_std_and_no_summary_scans_trials(tmp_path):
    built = build_results(tmp_path / "one", seeds=(0,), summary=False, evaluations=("E2", "E5"))
    report = build_report(built.root)
    text = report.read_text()
    assert "no summary.json" in text
    df = pd.read_csv(built.root / "tables" / "segmentation_miou.csv").set_index("pretraining")
    # without summary.json, the pretraining variant is found from the checkpoint path in the segment config
    assert set(df.index) == {VARIANT[("barlow_twins", "vit_nano_patch8", 0.0051)],
                             VARIANT[("barlow_twins", "vit_nano_patch8", 0.05)],
                             VARIANT[("dino", "vit_nano_patch8", None)]}
    assert df["E2_std"].isna().all() and df["E5_std"].isna().all()
    rows = _md_table(built.root / "tables" / "segmentation_miou.md")[1:]
    assert rows and all("±" not in cell for row in rows for cell in row)
    assert "_No finished trial for: E1, E3, E4._" in text
    _assert_links_resolve(report)


def test_out_dir_elsewhere_and_relative_dirs(tmp_path):
    built = build_results(tmp_path / "res", dir_style="relative", seeds=(0,), evaluations=("E1",))
    out = tmp_path / "elsewhere" / "rep"
    report = build_report(built.root, out_dir=out)
    assert report == out / "report.md"
    assert not (built.root / "report.md").exists()
    assert (out / "tables" / "segmentation_miou.csv").is_file()
    links = _links(report)
    assert any(ln.startswith("../../res/trials/") for ln in links)
    _assert_links_resolve(report)


def test_killed_report_keeps_previous_report(tmp_path, monkeypatch):
    built = build_results(tmp_path / "res", seeds=(0,), evaluations=("E2",))
    (built.root / "report.md").write_text("previous report\n")
    import analysis.figures as F

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(F, "contact_sheet", boom)
    with pytest.raises(RuntimeError):
        build_report(built.root)
    assert (built.root / "report.md").read_text() == "previous report\n"
    assert not list(built.root.rglob("*.tmp*"))


# ----------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TWINSEG_TRACEBACK", None)
    return subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), *args], capture_output=True,
                          text=True, cwd=str(REPO), env=env, timeout=120)


def test_cli_bad_results_dir_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    (other / "stuff").mkdir(parents=True)
    (other / "notes.txt").write_text("hello")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    for bad in (tmp_path / "does-not-exist", empty, other, afile):
        r = _cli(str(bad))
        assert r.returncode == 2, (bad, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("twinseg: error: "), r.stderr
        assert "Traceback" not in r.stderr and str(bad) in lines[0]
        assert not (bad / "report.md").exists()


def test_cli_writes_report(tmp_path):
    built = build_results(tmp_path / "res", seeds=(0,), evaluations=("E4",))
    r = _cli(str(built.root), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"report: {tmp_path / 'out' / 'report.md'}"
    assert (tmp_path / "out" / "report.md").is_file()


def test_error_bars_only_where_a_std_exists():
    """A single seed has no std: no error bar is drawn (a zero-height one would read as zero spread);
    where some points have a std, the others get 0."""
    from analysis.figures import _yerr

    assert _yerr([None, None]) is None
    assert _yerr([]) is None
    assert _yerr([None, 1.5]) == [0.0, 1.5]
    assert _yerr([0.0, 2.0]) == [0.0, 2.0]


def test_report_style_does_not_leak_into_other_figures(full):
    """Building the report (module fixture `full` ran it) leaves matplotlib's global rcParams alone:
    the diagnostics' heatmaps drawn later in the same process must not get grid lines."""
    import matplotlib

    import analysis.figures as figures

    assert figures.STYLE["axes.grid"] is True
    assert matplotlib.rcParams["axes.grid"] is False
    assert matplotlib.rcParams["font.size"] == matplotlib.rcParamsDefault["font.size"]
