"""ARCHITECTURE.md is checked against the code: the metrics.json keys it lists are the schema's, the
SSL methods, evaluations and artifacts it names exist, and it points at nothing outside the repo."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.metrics import registry
from core.runs import metrics_schema
from core.stages import stages

DOC = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()


@pytest.mark.parametrize("stage", list(stages()))
def test_metrics_keys_listed_equal_the_run_record(stage):
    """ARCHITECTURE.md lists the run record (core/runs/metrics_schema.py); the measurements are read from the
    metric registry, so a new metric needs no edit here. Every key of the schema is one or the other."""
    block = re.search(rf"<!-- metrics-keys {stage} -->\n(.*?)<!-- /metrics-keys -->", DOC, re.S)
    assert block, f"ARCHITECTURE.md has no metrics-keys block for {stage}"
    listed = re.findall(r"`([^`]+)`", block.group(1))
    assert sorted(listed) == sorted(metrics_schema.record_keys(stage)), \
        "update ARCHITECTURE.md from core/runs/metrics_schema.py"
    assert len(listed) == len(set(listed))
    measured = {s.key for s in registry.metrics(stage) if s.source != metrics_schema.__name__}
    assert set(metrics_schema.keys(stage)) == set(listed) | measured and not measured & set(listed)


def test_methods_evaluations_and_artifacts_named_exist():
    from core.evaluations import EVALUATIONS
    from core.methods.registry import ssl_methods
    from core.runs.pretrain import BACKBONE
    from core.runs.segment import MODEL

    for name, spec in ssl_methods().items():
        assert f"`{name}`" in DOC and spec.module.__name__ in DOC, name
    assert "E1..E5" in DOC and list(EVALUATIONS) == ["E1", "E2", "E3", "E4", "E5"]
    for artifact in (BACKBONE, MODEL, "metrics.json", "config.json", "history.csv", "checkpoints/last.ckpt"):
        assert artifact in DOC
    for path in re.findall(r"`((?:core|experiments|analysis|tests)/[\w/]+\.py)`", DOC):
        assert (Path(__file__).resolve().parents[1] / path).is_file(), f"ARCHITECTURE.md names missing {path}"


def test_nothing_points_outside_the_repository():
    assert "../" not in DOC and "shared/" not in DOC and "MISSION" not in DOC
