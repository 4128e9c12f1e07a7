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
from core.stages import PRETRAIN, SEGMENT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the pretraining variants that segmentation trials consume (VICReg is pretrained but not evaluated)
VARIANT = {
    ("barlow_twins", "vit_nano_patch8", 0.0051): "Barlow Twins vit_nano_patch8 init=random λ=0.0051",
    ("barlow_twins", "vit_nano_patch8", 0.05): "Barlow Twins vit_nano_patch8 init=random λ=0.05",
    ("barlow_twins", "resnet_tiny", 0.0051): "Barlow Twins resnet_tiny init=random λ=0.0051",
    ("dino", "vit_nano_patch8", None): "DINO vit_nano_patch8 init=random",
}
VICREG = "VICReg vit_nano_patch8 init=random"


def _variant_of(pre_metrics: dict) -> str:
    return VARIANT[(pre_metrics["method"], pre_metrics["backbone"], pre_metrics.get("lambd"))]


def _mean_std(vals):
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _expected_seg(built, key: str) -> dict:
    """(evaluation, variant) -> list of metric values over finished seeds."""
    out: dict = {}
    for tid, t in built.trials.items():
        if t["stage"] != SEGMENT.name or t["status"] != "done" or not t["has_metrics_file"]:
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
        cands = [t for t in built.trials.values() if t["stage"] == SEGMENT.name and t["metrics"]["evaluation"] == ev]
        best = max(cands, key=lambda t: t["metrics"]["mIoU"])
        m = best["metrics"]
        for name, v in zip(m["class_names"], m["IoU"]):
            assert pc.loc[name, ev] == pytest.approx(v)
        assert pc.loc["mIoU", ev] == pytest.approx(m["mIoU"])
        assert best["id"] in (built.root / "tables" / "per_class_iou.md").read_text()


def test_pretraining_and_method_comparison_tables(full):
    built, report = full
    df = pd.read_csv(built.root / "tables" / "pretraining.csv")
    assert len(df) == 5
    # sorted by backbone, init, then method in the results' (grid's) order, then the other axes
    assert list(zip(df["backbone"], df["method"])) == [
        ("resnet_tiny", "barlow_twins"), ("vit_nano_patch8", "barlow_twins"), ("vit_nano_patch8", "barlow_twins"),
        ("vit_nano_patch8", "dino"), ("vit_nano_patch8", "vicreg")]
    for _, row in df.iterrows():
        lam = None if pd.isna(row["lambd"]) else row["lambd"]
        trials = [t["metrics"] for t in built.trials.values() if t["stage"] == PRETRAIN.name
                  and t["metrics"]["method"] == row["method"] and t["metrics"]["backbone"] == row["backbone"]
                  and (lam is None or math.isclose(t["metrics"]["lambd"], lam))]
        assert row["n_seeds"] == len(trials) == (1 if row["method"] == "vicreg" else 2)
        assert row["method_label"] == trials[0]["method_label"]
        for key in ("knn_acc", "knn_acc_init", "linear_probe_acc", "dense_rank", "dense_local_var", "final_loss",
                    "wall_time_s", "images_per_s", "peak_mem_mb"):
            m, s = _mean_std([t[key] for t in trials])
            assert row[f"{key}_mean"] == pytest.approx(m), key
            if s is None:
                assert pd.isna(row[f"{key}_std"]), key
            else:
                assert row[f"{key}_std"] == pytest.approx(s), key
        m, _ = _mean_std([t["device_seconds"] / 3600 for t in trials])
        assert row["device_hours_mean"] == pytest.approx(m)
        if row["method"] != "barlow_twins":  # lambd is null in their labels, and they write no C statistics
            assert pd.isna(row["lambd"]) and pd.isna(row["cc_diag_mean_mean"])
        else:
            assert row["cc_diag_mean_mean"] == pytest.approx(_mean_std([t["cc_diag_mean"] for t in trials])[0])
    # the VICReg row, labelled by its method_label, with the lambda column blank
    md = _md_table(built.root / "tables" / "pretraining.md")
    header, body = md[0], md[1:]
    assert header[:6] == ["Method", "Backbone", "Init", "λ", "Seeds", "Epochs"]
    vic = [r for r in body if r[0] == "VICReg"]
    assert len(vic) == 1 and vic[0][1:5] == ["vit_nano_patch8", "random", "—", "1"]
    assert {r[0] for r in body} == {"Barlow Twins", "DINO", "VICReg"}
    assert VICREG in set(df["variant"])

    cmp = pd.read_csv(built.root / "tables" / "method_comparison.csv")
    assert set(cmp["backbone"]) == {"vit_nano_patch8"}  # resnet_tiny has one method only: not compared
    assert set(cmp["method"]) == {"barlow_twins", "dino", "vicreg"}
    assert set(cmp["method_label"]) == {"Barlow Twins", "DINO", "VICReg"}
    assert len(cmp) == 4  # both Barlow Twins lambdas, DINO, VICReg
    for method, n in (("dino", 2), ("vicreg", 1)):
        row = cmp[cmp["method"] == method].iloc[0]
        trials = [t["metrics"] for t in built.trials.values() if t["stage"] == PRETRAIN.name
                  and t["metrics"]["method"] == method]
        assert row["n_seeds"] == len(trials) == n
        assert row["knn_per_device_hour_mean"] == pytest.approx(
            np.mean([t["knn_acc"] / (t["device_seconds"] / 3600) for t in trials]))
        assert row["cost_vs_cheapest"] > 1.0
        # more expensive: at the cheapest variant's budget it has done fewer epochs -> lower k-NN than its final one
        assert row["knn_at_equal_budget_mean"] < row["knn_acc_mean"]
    cheapest = cmp[cmp["cost_vs_cheapest"] == cmp["cost_vs_cheapest"].min()].iloc[0]
    assert cheapest["method"] == "barlow_twins" and cheapest["cost_vs_cheapest"] == pytest.approx(1.0)
    # relative to the cheapest: device hours / cheapest device hours
    assert (cmp["cost_vs_cheapest"] * cheapest["device_hours_mean"]).tolist() == pytest.approx(
        cmp["device_hours_mean"].tolist())
    cmd = _md_table(built.root / "tables" / "method_comparison.md")
    assert cmd[0][:4] == ["Backbone", "Init", "Method", "λ"]
    assert [r[2] for r in cmd[1:]].count("VICReg") == 1
    text = report.read_text()
    assert "### SSL methods compared at equal budget" in text and "Barlow Twins vs DINO vs VICReg" in text
    # the evaluations' descriptions come from their declaration
    from core.evaluations import EVALUATIONS

    assert "; ".join(f"{k} = {v['short']}" for k, v in EVALUATIONS.items()) in text


def test_analysis_names_no_method():
    """Methods, evaluations and axes are read from the results / their declarations: the analysis
    code names none of the SSL methods (outside comments and docstrings)."""
    import ast

    for path in sorted((REPO / "analysis").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not re.search(r"barlow|dino|vicreg", node.value, re.I), f"{path.name}: {node.value!r}"
            if isinstance(node, ast.Name):
                assert not re.search(r"barlow|dino|vicreg|\bbt\b", node.id, re.I), f"{path.name}: {node.id}"


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


def _relabel(root: Path, fn) -> None:
    """Rewrite summary.json's labels: fn(entry) edits entry["labels"] in place."""
    import json

    doc = json.loads((root / "summary.json").read_text())
    for e in doc["trials"]:
        fn(e)
    (root / "summary.json").write_text(json.dumps(doc))


def test_lambda_sweep_is_drawn_from_the_labels(tmp_path):
    import json

    from analysis.figures import sweep_lines, sweep_segmentation
    from analysis.results import load_results

    built = build_results(tmp_path / "res", seeds=(0,), evaluations=("E2", "E5"))
    res = load_results(built.root)
    lines = {k.label: [g.variant["lambd"] for g in gs] for k, gs in sweep_lines(res).items()}
    # the groups with a numeric lambd label, one line per (method, backbone, source): not DINO, not VICReg
    assert lines == {"Barlow Twins resnet_tiny init=random": [0.0051],
                     "Barlow Twins vit_nano_patch8 init=random": [0.0051, 0.05]}
    ev, seg = sweep_segmentation(res)
    assert ev == "E2" and {k.label: [x for x, _ in pts] for k, pts in seg.items()} == {
        "Barlow Twins vit_nano_patch8 init=random": [0.0051, 0.05]}

    # The labels are the truth: the lambda=0.05 trials relabelled 0.2 (metrics.json and config.json no
    # longer say it), and a VICReg trial given a lambd label and another axis, show up as such.
    def edit(e):
        lab = e["labels"]
        if lab.get("lambd") == 0.05:
            lab["lambd"] = 0.2
        if lab.get("method") == "vicreg":
            lab.update({"lambd": 0.01, "scale": 2})
    _relabel(built.root, edit)
    for tid in built.ids(PRETRAIN.name):
        mp = built.root / "trials" / tid / "metrics.json"
        m = json.loads(mp.read_text())
        m.pop("lambd", None)
        mp.write_text(json.dumps(m))
    res = load_results(built.root)
    lines = {k.label: [g.variant["lambd"] for g in gs] for k, gs in sweep_lines(res).items()}
    assert lines == {"Barlow Twins resnet_tiny init=random": [0.0051],
                     "Barlow Twins vit_nano_patch8 init=random": [0.0051, 0.2],
                     "VICReg vit_nano_patch8 init=random scale=2": [0.01]}
    _, seg = sweep_segmentation(res)
    assert [x for pts in seg.values() for x, _ in pts] == [0.0051, 0.2]
    report = build_report(built.root)
    assert (built.root / "figures" / "lambda_sweep.png").read_bytes()[:8] == PNG_MAGIC
    df = pd.read_csv(built.root / "tables" / "pretraining.csv")
    assert "VICReg vit_nano_patch8 init=random λ=0.01 scale=2" in set(df["variant"])
    assert sorted(df["lambd"].dropna()) == [0.0051, 0.0051, 0.01, 0.2]
    assert "| scale" in (built.root / "tables" / "pretraining.md").read_text()
    seg_df = pd.read_csv(built.root / "tables" / "segmentation_miou.csv")
    assert "Barlow Twins vit_nano_patch8 init=random λ=0.2" in set(seg_df["pretraining"])

    # no numeric lambd label anywhere: no sweep figure (and no stale one), no λ column
    _relabel(built.root, lambda e: e["labels"].update({"lambd": None}))
    report = build_report(built.root)
    assert not (built.root / "figures" / "lambda_sweep.png").exists()
    assert "_Lambda sweep: nothing to plot yet._" in report.read_text()
    md = _md_table(built.root / "tables" / "pretraining.md")
    assert "λ" not in md[0] and "scale" in md[0]


def test_variant_is_a_named_mapping():
    from analysis.results import Variant

    a = Variant({"backbone": "vit", "source": "random", "method": "m1", "lambd": None, "seed": 3, "k": 0.5},
                "Method One")
    b = Variant({"method": "m1", "k": 0.5, "source": "random", "backbone": "vit"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1  # null axes and the seed are not part of it
    assert dict(a) == {"backbone": "vit", "source": "random", "method": "m1", "k": 0.5}
    assert a["k"] == 0.5 and "lambd" not in a and a.get("seed") is None
    assert a.label == "Method One vit init=random k=0.5"
    assert b.label == "m1 vit init=random k=0.5"  # no method_label: the method's name
    assert Variant({"method": "m1", "lambd": 0.0051}).label == "m1 ? init=? λ=0.0051"
    assert a.without("k") == Variant({"backbone": "vit", "source": "random", "method": "m1"})


def test_old_format_folder_without_labels(tmp_path):
    """Folders written before summary labels: no labels, no method_label, a flat lambd in every
    pretraining config and metrics.json (DINO included). Variants come from metrics / config; the
    flat lambd counts only for the method whose runs report the statistics it weighs."""
    built = build_results(tmp_path / "old", legacy=True, partial=True)
    import json

    doc = json.loads((built.root / "summary.json").read_text())
    assert all("labels" not in e for e in doc["trials"])
    dino_cfg = json.loads((built.root / "trials" / "pretrain_dino_vit_nano_patch8_s0" / "config.json").read_text())
    assert dino_cfg["lambd"] == 0.0051 and "barlow_twins" not in dino_cfg
    report = build_report(built.root)
    text = report.read_text()
    df = pd.read_csv(built.root / "tables" / "pretraining.csv")
    assert set(df["variant"]) == {"barlow_twins vit_nano_patch8 init=random λ=0.0051",
                                  "barlow_twins vit_nano_patch8 init=random λ=0.05",
                                  "barlow_twins resnet_tiny init=random λ=0.0051",
                                  "dino vit_nano_patch8 init=random"}
    assert pd.isna(df[df["method"] == "dino"].iloc[0]["lambd"])
    seg = pd.read_csv(built.root / "tables" / "segmentation_miou.csv").set_index("pretraining")
    assert seg.loc["dino vit_nano_patch8 init=random", "E5_n"] == 1
    assert seg.loc["barlow_twins vit_nano_patch8 init=random λ=0.0051", "E2_n"] == 2
    assert set(pd.read_csv(built.root / "tables" / "method_comparison.csv")["method"]) == {"barlow_twins", "dino"}
    trials = (built.root / "tables" / "trials.md").read_text()
    assert "dino vit_nano_patch8 init=random seed=1" in trials  # the failed run: no lambda either
    assert (built.root / "figures" / "lambda_sweep.png").is_file()
    assert "pretrain_dino_vit_nano_patch8_s1 (failed: CUDA out of memory at epoch 2 (RuntimeError))" in text
    _assert_links_resolve(report)
    # the same folder without summary.json (trials scanned)
    (built.root / "summary.json").unlink()
    build_report(built.root)
    df2 = pd.read_csv(built.root / "tables" / "pretraining.csv")
    assert set(df2["variant"]) == set(df["variant"])


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


def test_cli_out_on_a_file_is_one_line(tmp_path):
    """`--out FILE` (or a file where a folder of it must go): one line, exit 2, the file untouched."""
    built = build_results(tmp_path / "res", seeds=(0,), evaluations=("E4",))
    afile = tmp_path / "report.txt"
    afile.write_text("mine")
    for out in (afile, afile / "sub"):
        r = _cli(str(built.root), "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("twinseg: error: ") and "is a file" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert afile.read_text() == "mine"


def test_a_boolean_metric_is_not_a_number():
    """`mIoU: true` in a metrics.json is not 1.0: the tables read it as missing (a blank cell with a note)."""
    from analysis.results import finite

    assert finite(True) is None and finite(False) is None
    assert finite(1) == 1.0 and finite("2.5") == 2.5 and finite(float("nan")) is None


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


def test_protocol_line_beside_segmentation_tables(tmp_path):
    """report.md states how the segmentation numbers were measured, read from the runs' eval_protocol
    (older runs without it are counted, not guessed)."""
    import json

    built = build_results(tmp_path / "smoke-20250101-000000")
    segs = sorted((built.root / "trials").glob("segment_*/metrics.json"))
    assert len(segs) >= 2
    proto = {"split": "val", "images": 200, "resolution": "original", "eval_scale": 64, "eval_max_long": 256,
             "inference": "slide", "slide_crop": 64, "slide_stride": 42}
    for p in segs[:-1]:
        m = json.loads(p.read_text())
        m.update(eval_protocol=proto, val_pixels=12345)
        p.write_text(json.dumps(m))
    text = build_report(built.root).read_text()
    seg_part = text.split("## Segmentation (stage 2)")[1].split("## Pretraining")[0]
    assert ("Protocol: split val (200 images), scored at original resolution after a keep-ratio resize to short "
            "side 64, slide inference (crop 64, stride 42); 255 ignored; 12,345 labelled pixels scored") in seg_part
    assert "Protocol: 1 run(s) written before the protocol was recorded" in seg_part


def test_emerging_properties_table_and_figure(full):
    """One row per pretraining variant: k-NN, probe, attention Jaccard, dense probe, dense rank, collapsed
    (a dash where a run measured nothing); the figure pairs each measure with the segmentation trials
    built on that pretraining; the collapsed run is named with its reason."""
    built, report = full
    df = pd.read_csv(built.root / "tables" / "emerging_properties.csv")
    assert len(df) == 5
    pre = [t["metrics"] for t in built.trials.values() if t["stage"] == PRETRAIN.name]
    for _, row in df.iterrows():
        mine = [m for m in pre if m["method"] == row["method"] and m["backbone"] == row["backbone"]
                and (pd.isna(row["lambd"]) or math.isclose(m["lambd"], row["lambd"]))]
        for key in ("knn_acc", "linear_probe_acc", "dense_probe_miou", "dense_rank"):
            assert row[f"{key}_mean"] == pytest.approx(np.mean([m[key] for m in mine])), key
        if row["backbone"].startswith("vit"):
            assert row["attn_jaccard_mean"] == pytest.approx(np.mean([m["attn_jaccard"] for m in mine]))
        else:  # no attention on a CNN: not measured
            assert pd.isna(row["attn_jaccard_mean"]) and row["attn_jaccard_n"] == 0
        assert row["collapsed_n"] == sum(m["collapsed"] for m in mine)
    md = _md_table(built.root / "tables" / "emerging_properties.md")
    header, body = md[0], md[1:]
    assert header[-6:] == ["k-NN acc", "Linear probe", "Attn Jaccard (%)", "Dense probe mIoU", "Dense eff. rank",
                           "Collapsed"]
    by_label = {(r[0], r[1]): r for r in body}
    assert by_label[("DINO", "vit_nano_patch8")][-1] == "1 of 2"
    assert by_label[("VICReg", "vit_nano_patch8")][-1] == "no"
    assert by_label[("Barlow Twins", "resnet_tiny")][header.index("Attn Jaccard (%)")] == "—"
    # the pretraining table carries the flag too, and both name the collapsed trial and its reason
    pmd = _md_table(built.root / "tables" / "pretraining.md")
    assert "Collapsed" in pmd[0]
    text = report.read_text()
    assert "### Emerging properties" in text
    assert "pretrain_dino_vit_nano_patch8_s1: uniform collapse" in text
    assert "figures/emerging_properties.png" in text
    png = built.root / "figures" / "emerging_properties.png"
    assert png.read_bytes()[:8] == PNG_MAGIC

    from analysis.figures import spearman
    from analysis.results import load_results
    from analysis.tables import emerging_points

    res = load_results(built.root)
    pts = emerging_points(res, "knn_acc")
    seg = [t for t in built.trials.values() if t["stage"] == SEGMENT.name and t["status"] == "done"]
    assert len(pts) == len(seg)  # every finished segmentation trial is paired with its pretraining
    by_id = {t["id"]: t for t in built.trials.values()}
    want = sorted((t["metrics"]["evaluation"], by_id[t["depends_on"][0]]["metrics"]["knn_acc"], t["metrics"]["mIoU"])
                  for t in seg)
    got = sorted((e, x, y) for e, x, y, _ in pts)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1:] for g in got] == [pytest.approx(w[1:]) for w in want]
    assert sum(c for *_, c in pts) == 1  # the E5 trial on the collapsed DINO seed
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


# ----------------------------------------------------------------------------- any folder (helper E)
_HEADLINE = ("mIoU", "aAcc", "mAcc", "IoU", "knn_acc", "knn_acc_init", "final_loss", "linear_probe_acc")


def test_null_and_nonfinite_metrics_still_write_a_report(tmp_path):
    """Every run of an evaluation with a null metric (and NaN elsewhere): report.md is written, the
    values are n/a with a note naming the trials, no figure or table crashes the report."""
    import json

    built = build_results(tmp_path / "res", seeds=(0,))
    for m in built.root.glob("trials/*/metrics.json"):
        d = json.loads(m.read_text())
        for k in _HEADLINE:
            if k in d:
                d[k] = None if d.get("stage") == SEGMENT.name else float("nan")
        m.write_text(json.dumps(d))
    s = json.loads((built.root / "summary.json").read_text())
    for t in s["trials"]:
        for k in _HEADLINE:
            if k in (t.get("metrics") or {}):
                t["metrics"][k] = None
    (built.root / "summary.json").write_text(json.dumps(s))
    report = build_report(built.root)
    text = report.read_text()
    assert "- note: mIoU is n/a (missing in metrics.json) for" in text
    assert "- note: knn_acc is n/a (non-finite in metrics.json) for" in text
    miou = _md_table(built.root / "tables" / "segmentation_miou.md")
    assert all(cell in ("", "n/a", "nan") for row in miou[1:] for cell in row[1:]), miou


def test_single_run_folder_gets_a_one_trial_report(tmp_path):
    built = build_results(tmp_path / "res", seeds=(0,), evaluations=("E4",))
    run = next(p.parent for p in built.root.glob("trials/segment_*/metrics.json"))
    report = build_report(run)
    text = report.read_text()
    assert "1 of 1 trials finished" in text and "single run folder" in text
    assert report == run / "report.md"


# ----------------------------------------------------------------------------- intervals, datasets, controls
T975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2}: closed form of Student's t with 2 dof


def _seg_values(built, key: str, pick) -> dict:
    """{seed: metric} of the finished segmentation trials that `pick(trial entry)` selects."""
    return {t["metrics"]["seed"]: t["metrics"][key] for t in built.trials.values()
            if t["stage"] == SEGMENT.name and t["status"] == "done" and pick(t)}


def _paired_direct(a: dict, b: dict) -> tuple[float, float, float]:
    d = np.asarray([a[s] - b[s] for s in sorted(a)], dtype=float)
    assert d.size == 3
    half = T975_2 * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def test_segmentation_differences_match_a_direct_paired_interval(tmp_path):
    """Three seeds of E2 on the grid's pretraining and of an E2 random-init control: each difference cell is the
    paired t interval computed here by hand (closed-form t quantile), and the report says so."""
    from analysis.intervals import difference

    built = build_results(tmp_path / "smoke-20250101-000000", seeds=(0, 1, 2), vicreg=False,
                          controls=[("E2", "random")])
    report = build_report(built.root)
    df = pd.read_csv(built.root / "tables" / "segmentation_differences.csv").set_index("comparison")
    ctrl = "vit_nano_patch8 weights=random (control)"
    is_ctrl = lambda t: t["config"]["source"] == "random"  # noqa: E731
    for lam in (0.0051, 0.05):
        row = f"Barlow Twins vit_nano_patch8 init=random λ={lam:g} − {ctrl}"
        for key in ("mIoU", "aAcc"):
            a = _seg_values(built, key, lambda t: t["metrics"]["evaluation"] == "E2" and not is_ctrl(t)
                            and f"_l{lam:g}_" in t["id"])
            b = _seg_values(built, key, lambda t: t["metrics"]["evaluation"] == "E2" and is_ctrl(t))
            mean, low, high = _paired_direct(a, b)
            assert df.loc[row, f"{key}_diff"] == pytest.approx(mean)
            assert df.loc[row, f"{key}_low"] == pytest.approx(low)
            assert df.loc[row, f"{key}_high"] == pytest.approx(high)
            assert df.loc[row, f"{key}_n"] == 3 and bool(df.loc[row, f"{key}_paired"])
            assert bool(df.loc[row, f"{key}_excludes_zero"]) == (low > 0 or high < 0)
    # the markdown cell is the interval's text; the control lifts E2 by ~6 points: the seeds resolve it
    md = {r[0]: r for r in _md_table(built.root / "tables" / "segmentation_differences.md")}
    row = f"Barlow Twins vit_nano_patch8 init=random λ=0.0051 − {ctrl}"
    a = _seg_values(built, "mIoU", lambda t: "_l0.0051_" in t["id"] and t["metrics"]["evaluation"] == "E2")
    b = _seg_values(built, "mIoU", lambda t: t["metrics"]["evaluation"] == "E2" and is_ctrl(t))
    assert md[row][3] == difference(a, b).text and md[row][3].endswith("(3 paired; excludes 0)")
    # each λ against the method's declared default, each evaluation against its declared baseline
    labels = set(df.index)
    assert "λ=0.05 − λ=0.0051: Barlow Twins vit_nano_patch8 init=random" in labels
    assert "E3 − E2: Barlow Twins vit_nano_patch8 init=random λ=0.0051" in labels
    assert "E4 − E2: Barlow Twins vit_nano_patch8 init=random λ=0.0051" in labels
    assert ("E5 DINO vit_nano_patch8 init=random − E4 Barlow Twins vit_nano_patch8 init=random λ=0.0051"
            in labels)
    e3 = _seg_values(built, "mIoU", lambda t: t["metrics"]["evaluation"] == "E3")
    e2 = _seg_values(built, "mIoU", lambda t: "_l0.0051_" in t["id"] and t["metrics"]["evaluation"] == "E2")
    assert df.loc["E3 − E2: Barlow Twins vit_nano_patch8 init=random λ=0.0051", "mIoU_diff"] == pytest.approx(
        np.mean([e3[s] - e2[s] for s in e2]))
    text = report.read_text()
    assert "**Segmentation differences a − b" in text and "95% interval" in text
    assert "E3 against E2" in text and "E5 against E4" in text


def test_one_seed_differences_say_no_interval(tmp_path):
    built = build_results(tmp_path / "smoke-20250101-000000", seeds=(0,), vicreg=False, controls=[("E2", "random")])
    build_report(built.root)
    rows = _md_table(built.root / "tables" / "segmentation_differences.md")
    assert len(rows) > 4
    for r in rows[1:]:
        assert r[3].endswith("(one seed: no interval)") and r[4].endswith("(one seed: no interval)")
    df = pd.read_csv(built.root / "tables" / "segmentation_differences.csv")
    assert df["mIoU_low"].isna().all() and df["mIoU_diff"].notna().all()


def test_evaluation_bars_draw_the_95_interval(tmp_path, monkeypatch):
    """Each bar's error bar spans mean ± the t half-width of its seeds (analysis/intervals.py errorbar); a
    one-seed row has none."""
    import analysis.figures as F
    from analysis.intervals import errorbar
    from analysis.results import load_results

    built = build_results(tmp_path / "smoke-20250101-000000", seeds=(0, 1, 2), vicreg=False)
    res = load_results(built.root)
    figs = []
    monkeypatch.setattr(F, "_save", lambda fig, path: figs.append(fig) or path)
    assert F.evaluation_bars(res, tmp_path / "bars.png") is not None
    ax = figs[0].axes[0]  # mIoU
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    points = F.bar_points(res, "mIoU")
    assert len(bars) == len(points) == 6
    for bar, (ev, lab, mean, half) in zip(bars, points):
        vals = _seg_values(built, "mIoU", lambda t: t["metrics"]["evaluation"] == ev
                           and _variant_of(built.trials[t["depends_on"][0]]["metrics"]) in lab)
        assert (mean, half) == pytest.approx(errorbar(vals.values()))
        assert bar.patches[0].get_height() == pytest.approx(mean)
        (seg,) = bar.errorbar.lines[2][0].get_segments()
        assert seg[1][1] - seg[0][1] == pytest.approx(2 * half) and half > 0
    one = build_results(tmp_path / "one-20250101-000000", seeds=(0,), vicreg=False)
    figs.clear()
    F.evaluation_bars(load_results(one.root), tmp_path / "bars1.png")
    assert all(c.errorbar is None for c in figs[0].axes[0].containers if hasattr(c, "patches"))


def test_one_table_set_per_dataset_with_controls_beside_their_rows(tmp_path):
    built = build_results(tmp_path / "paper-20250101-000000", vicreg=False, datasets=("voc", "coco_stuff"),
                          controls=[("E2", "random"), ("E2", "imagenet"), ("E5", "dino")])
    report = build_report(built.root)
    tables = built.root / "tables"
    assert not (tables / "segmentation_miou.csv").exists()
    for ds in ("voc", "coco_stuff"):
        df = pd.read_csv(tables / f"segmentation_miou_{ds}.csv").set_index("pretraining")
        for ev, var in (("E2", VARIANT[("barlow_twins", "vit_nano_patch8", 0.0051)]),
                        ("E2", "vit_nano_patch8 weights=imagenet (control)"),
                        ("E5", "vit_nano_patch8 weights=dino (control)")):
            vals = [t["metrics"]["mIoU"] for t in built.trials.values() if t["stage"] == SEGMENT.name
                    and t["metrics"]["dataset"] == ds and t["metrics"]["evaluation"] == ev
                    and (t["depends_on"] and _variant_of(built.trials[t["depends_on"][0]]["metrics"]) == var
                         or not t["depends_on"] and var.startswith(f"vit_nano_patch8 weights={t['config']['source']} "))]
            assert len(vals) == 2 and df.loc[var, f"{ev}_mean"] == pytest.approx(np.mean(vals))
        # controls after the rows they control: E2 runs = grid pretraining rows, then its two controls
        runs = pd.read_csv(tables / f"segmentation_runs_{ds}.csv")
        assert set(runs["dataset"]) == {ds}
        e2 = list(runs[runs["evaluation"] == "E2"]["control"])
        assert e2 == [False, False, True, True]
        rows = [r[0] for r in _md_table(tables / f"segmentation_miou_{ds}.md")[1:]]
        vit_rows = [r for r in rows if "vit_nano_patch8" in r]
        assert [r.endswith("(control)") for r in vit_rows] == [False, False, False, True, True, True]
        assert rows.index(vit_rows[0]) > rows.index(VARIANT[("barlow_twins", "resnet_tiny", 0.0051)])
        diffs = set(pd.read_csv(tables / f"segmentation_differences_{ds}.csv")["comparison"])
        assert {"DINO vit_nano_patch8 init=random − vit_nano_patch8 weights=dino (control)",
                "Barlow Twins vit_nano_patch8 init=random λ=0.05 − vit_nano_patch8 weights=imagenet (control)",
                "Barlow Twins vit_nano_patch8 init=random λ=0.0051 − vit_nano_patch8 weights=random (control)"} <= diffs
        pc = pd.read_csv(tables / f"per_class_iou_{ds}.csv").set_index("class")
        best = max((t for t in built.trials.values() if t["stage"] == SEGMENT.name
                    and t["metrics"]["dataset"] == ds and t["metrics"]["evaluation"] == "E1"),
                   key=lambda t: t["metrics"]["mIoU"])
        assert pc.loc["mIoU", "E1"] == pytest.approx(best["metrics"]["mIoU"])
    text = report.read_text()
    assert text.index("### Dataset: voc") < text.index("segmentation_miou_voc.csv") < text.index(
        "### Dataset: coco_stuff") < text.index("segmentation_miou_coco_stuff.csv")
    assert "voc: Segmentation mIoU (%)" in text and "coco_stuff: Segmentation mIoU (%)" in text
    _assert_links_resolve(report)


def test_pretraining_differences_vs_init_and_default_lambda(tmp_path):
    built = build_results(tmp_path / "smoke-20250101-000000", seeds=(0, 1, 2), vicreg=False)
    build_report(built.root)
    df = pd.read_csv(built.root / "tables" / "pretraining.csv").set_index("variant")
    knn = {}
    for t in built.trials.values():
        if t["stage"] == PRETRAIN.name:
            m = t["metrics"]
            knn.setdefault(_variant_of(m), {})[m["seed"]] = (m["knn_acc"], m["knn_acc_init"])
    hi, lo = VARIANT[("barlow_twins", "vit_nano_patch8", 0.05)], VARIANT[("barlow_twins", "vit_nano_patch8", 0.0051)]
    for var, vals in knn.items():
        mean, low, high = _paired_direct({s: a for s, (a, _) in vals.items()}, {s: b for s, (_, b) in vals.items()})
        assert (df.loc[var, "knn_acc_vs_init_diff"], df.loc[var, "knn_acc_vs_init_low"],
                df.loc[var, "knn_acc_vs_init_high"]) == pytest.approx((mean, low, high))
    d = [knn[hi][s][0] - knn[lo][s][0] for s in (0, 1, 2)]
    assert df.loc[hi, "knn_acc_vs_default_lambd_diff"] == pytest.approx(np.mean(d))
    assert math.isnan(df.loc[lo, "knn_acc_vs_default_lambd_diff"])  # the default λ row itself
    rows = _md_table(built.root / "tables" / "pretraining.md")
    c = rows[0].index("Δ k-NN vs default λ")
    assert [r[c] for r in rows[1:] if r[0] == "DINO"] == ["—"]
