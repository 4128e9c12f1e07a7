"""The metric registry (core/metrics/registry.py): one declaration per metrics.json key, read by the schema,
the runs and the report. A toy metric registered here reaches metrics.json and the report by itself."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.metrics import registry
from core.metrics.registry import AFTER, BEFORE, Column, EvalContext, MetricSpec
from core.runs import metrics_schema
from core.stages import PRETRAIN, SEGMENT, stages

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _embedding_norm(seen: dict):
    """A toy evaluation: the mean L2 norm of the pooled embeddings of the k-NN val images."""
    def compute(ctx: EvalContext) -> float:
        from core.methods.knn_monitor import extract_features

        feats, _ = extract_features(ctx.backbone, ctx.loaders.knn_val, ctx.device)
        seen.update(backbone=ctx.backbone, loader=ctx.loaders.knn_val, when=ctx.when)
        return float(feats.norm(dim=1).mean())

    return compute


def test_toy_metric_reaches_metrics_json_and_the_report(voc_root, tmp_path):
    from analysis.report import build_report
    from core.config import PretrainConfig
    from core.methods.knn_monitor import extract_features
    from core.runs.pretrain import run_pretrain

    seen: dict = {}
    toy = MetricSpec("embedding_norm_mean", PRETRAIN.name, "toy: mean L2 norm of the pooled k-NN val embeddings",
                     AFTER, compute=_embedding_norm(seen), order=1000,
                     columns=(Column("pretraining", "Emb. norm", 3, position=1000),))
    cfg = PretrainConfig.from_dict(dict(
        backbone="vit_nano_patch8", projector=(32, 32), batch_size=8, epochs=1, warmup_epochs=0.5,
        optimizer="adamw", wandb="disabled", device="cpu", gpu_augment=False, dense_probe_steps=0,
        data=dict(root=str(voc_root), image_size=32, limit_train=16, limit_val=8)))
    out = tmp_path / "run"
    assert "embedding_norm_mean" not in metrics_schema.keys(PRETRAIN)
    with registry.registered(toy):
        assert metrics_schema.keys(PRETRAIN)["embedding_norm_mean"] == toy.description
        metrics = run_pretrain(cfg, out, progress=False)
        # the column is read from the registry while the metric is declared
        report = build_report(out)
    assert "embedding_norm_mean" not in metrics_schema.keys(PRETRAIN)  # unregistered again

    written = json.loads((out / "metrics.json").read_text())
    value = written["embedding_norm_mean"]
    assert value == metrics["embedding_norm_mean"] and math.isfinite(value) and value > 0
    assert seen["when"] == AFTER
    feats, _ = extract_features(seen["backbone"], seen["loader"], "cpu")  # the trained, exported backbone
    assert value == pytest.approx(float(feats.norm(dim=1).mean()), rel=1e-5)
    # computed after every declared evaluation: the keys before it keep their order
    keys = list(written)
    assert keys.index("embedding_norm_mean") > keys.index("dense_probe_miou_init")

    df = pd.read_csv(out / "tables" / "pretraining.csv")
    assert df["embedding_norm_mean_mean"].iloc[0] == pytest.approx(value)
    md = (out / "tables" / "pretraining.md").read_text()
    header = [c.strip() for c in md.splitlines()[2].split("|")[1:-1]]
    assert header.index("Emb. norm") == header.index("Peak mem (MB)") + 1  # its declared position
    assert f"{value:.3f}" in md and "Emb. norm" in report.read_text()


def test_every_metrics_json_key_has_one_home():
    for stage in stages():
        specs = registry.metrics(stage)
        assert len({s.key for s in specs}) == len(specs), stage
        assert all(s.source and s.description for s in specs), stage
    dup = MetricSpec("knn_acc", PRETRAIN.name, "another k-NN accuracy")
    with pytest.raises(RuntimeError, match=r"'knn_acc' \(pretrain\) is declared twice: in core\.metrics\.knn"):
        registry.register(dup)
    assert registry.get_metric("knn_acc", PRETRAIN).source == "core.metrics.knn"
    # a key nobody declared is refused before metrics.json is written
    with pytest.raises(RuntimeError, match="undeclared_key are not declared"):
        metrics_schema.check(PRETRAIN.name, {"knn_acc": 1.0, "undeclared_key": 2.0})
    with pytest.raises(ValueError, match="when='sometimes'"):
        MetricSpec("x", PRETRAIN.name, "x", "sometimes")


def test_evaluations_run_in_declared_order_sharing_work():
    """`evaluate` computes a moment's specs by ascending `order`; work shared through `EvalContext.once` runs
    once per evaluation; `wants` says which keys the evaluation computes (k-NN: the linear probe after only)."""
    calls: list[str] = []

    def shared(ctx):
        return ctx.once("pair", lambda: calls.append("pair") or {"a": len(calls), "b": ctx.wants("toy_b")})

    specs = (MetricSpec("toy_b", SEGMENT.name, "b", AFTER, compute=lambda c: shared(c)["b"], order=2),
             MetricSpec("toy_a", SEGMENT.name, "a", AFTER, compute=lambda c: shared(c)["a"], order=1),
             MetricSpec("toy_c", SEGMENT.name, "c", BEFORE, compute=lambda c: shared(c)["b"], order=3))
    with registry.registered(*specs):
        after = registry.evaluate(SEGMENT, AFTER, EvalContext(None, None, None, "cpu", AFTER))
        before = registry.evaluate(SEGMENT, BEFORE, EvalContext(None, None, None, "cpu", BEFORE))
        skipped = registry.evaluate(SEGMENT, AFTER, skip=True)
    assert list(after) == ["toy_a", "toy_b"] and after == {"toy_a": 1, "toy_b": True}
    assert before == {"toy_c": False} and calls == ["pair", "pair"]
    assert skipped == {"toy_a": None, "toy_b": None}
    assert "toy_a" not in registry.descriptions(SEGMENT)
    # the pretraining evaluations keep the order of their computations: k-NN (+ linear probe), dense
    # statistics, attention Jaccard, dense probe
    assert [s.key for s in registry.scheduled(PRETRAIN, AFTER)] == [
        "knn_acc", "linear_probe_acc", "dense_rank", "dense_local_var", "attn_jaccard", "attn_jaccard_heads",
        "attn_jaccard_dino", "dense_probe_miou"]
    assert [s.key for s in registry.scheduled(PRETRAIN, BEFORE)] == [
        "knn_acc_init", "dense_rank_init", "dense_local_var_init", "attn_jaccard_init", "dense_probe_miou_init"]


def test_report_columns_come_from_the_registry():
    from analysis.tables import emerging_cols, pretrain_cols

    names = [c[0] for c in pretrain_cols()]
    assert names[:3] == ["knn_acc", "knn_acc_init", "linear_probe_acc"]
    assert {"cc_diag_mean", "device_hours", "gflop_per_image", "mfu_pct"} <= set(names)  # method / derived columns
    assert [c[0] for c in emerging_cols()] == ["knn_acc", "linear_probe_acc", "attn_jaccard", "dense_probe_miou",
                                               "dense_rank"]
    spec, col = next((s, c) for s, c in registry.columns("pretraining", PRETRAIN) if c.name == "device_hours")
    assert registry.column_value(spec, col, {"device_seconds": 7200.0}) == 2.0
    assert registry.column_value(spec, col, {"device_seconds": float("nan")}) is None
    assert [s.key for s in registry.headline(SEGMENT)] == ["mIoU", "aAcc", "mAcc"]
