"""ARCHITECTURE.md is checked against the code: the metrics.json keys it lists are the schema's, the
SSL methods, evaluations and artifacts it names exist, the name lists (backbones, heads, engine and benchmark
modules) and the summary.json keys are the code's, the layer rule (who imports ray) holds, the run folder lists
every entry a run writes, the sections other files point at exist, and it points at nothing outside the repo."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from core.metrics import registry
from core.runs import metrics_schema
from core.stages import stages

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "ARCHITECTURE.md").read_text()


def _listed(marker: str) -> list[str]:
    block = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /", DOC, re.S)
    assert block, f"ARCHITECTURE.md has no <!-- {marker} --> block"
    return re.findall(r"`([^`]+)`", block.group(1))


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
        assert (REPO / path).is_file(), f"ARCHITECTURE.md names missing {path}"


def _modules(package: str) -> list[str]:
    return sorted(p.stem for p in (REPO / package).glob("*.py") if p.stem != "__init__")


def _names(kind: str) -> list[str]:
    if kind == "backbones":
        from core.models.registry import list_backbones

        return list_backbones()
    if kind == "heads":
        from core.models.heads import list_heads

        return list_heads()
    return _modules({"engine": "experiments/engine", "benchmarks": "experiments/benchmarks"}[kind])


@pytest.mark.parametrize("kind", ["backbones", "heads", "engine", "benchmarks"])
def test_name_lists_equal_the_code(kind):
    """The registries' names and the packages' modules, each listed once."""
    listed = _listed(f"names {kind}")
    assert len(listed) == len(set(listed)), kind
    assert sorted(listed) == sorted(_names(kind)), f"update the ARCHITECTURE.md {kind} list"


def _imports(path: Path) -> set[str]:
    """Top-level packages `path` imports anywhere (imports inside functions too; relative ones skipped)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_layers_import_what_the_page_says():
    """core never imports ray, experiments or analysis; analysis never imports ray or experiments; ray is
    imported only under experiments/engine/ (the benchmarks' DDP check runs without it)."""
    bad, ray_users = [], set()
    for layer in ("core", "analysis", "experiments"):
        for p in sorted((REPO / layer).rglob("*.py")):
            rel = p.relative_to(REPO).as_posix()
            got = _imports(p)
            if "ray" in got:
                ray_users.add(rel)
            forbidden = {"core": {"ray", "experiments", "analysis"}, "analysis": {"ray", "experiments"}}.get(layer, set())
            bad += [f"{rel} imports {m}" for m in sorted(got & forbidden)]
    assert bad == []
    assert ray_users and all(u.startswith("experiments/engine/") for u in ray_users), sorted(ray_users)
    assert "experiments/engine/ray_ddp.py" in ray_users  # the check sees lazy imports inside functions


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert m, f"ARCHITECTURE.md has no '## {title}' section"
    return m.group(1)


def test_run_folder_lists_every_entry_a_run_writes():
    from core.folder_lock import LOCK_FILE
    from core.runs.skeleton import MANIFEST_FILE, RUN_FOLDER_ENTRIES

    text = _section("Run folder")
    missing = [e for e in (*RUN_FOLDER_ENTRIES, MANIFEST_FILE, LOCK_FILE) if e not in text]
    assert missing == [], f"ARCHITECTURE.md 'Run folder' does not list {missing}"


def test_summary_keys_listed_equal_what_the_driver_writes(tmp_path):
    """summary.json as `GridState.write_summary` writes it for the smoke grid (every trial pending)."""
    from experiments.engine import expand, gridfile, state
    from experiments.engine.console import Console

    grid = expand.load_grid(gridfile.resolve_grid("smoke"), check_models=False)
    (tmp_path / "trials").mkdir()
    state.GridState(grid, tmp_path, "2026-01-01T00:00:00", Console(), group="g", wandb="disabled").write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert _listed("summary-keys") == list(summary)
    assert summary["trials"] and all(_listed("summary-trial-keys") == list(t) for t in summary["trials"])


def test_sections_other_files_point_at_exist():
    """Where the code or README points at a section of this page (the file name, then the section's title in
    double quotes), that title is a heading here."""
    titles = {m.strip() for m in re.findall(r"^#+ (.*)$", DOC, re.M)}
    refs = []
    for p in [REPO / "README.md", *(q for d in ("core", "experiments", "analysis", "tests") for q in (REPO / d).rglob("*.py"))]:
        text = " ".join(p.read_text(encoding="utf-8").split())
        refs += [(p.relative_to(REPO).as_posix(), r) for r in re.findall(r'ARCHITECTURE\.md[,(\s]+"([^"]+)"', text)]
    assert len(refs) >= 4, refs
    missing = [(f, r) for f, r in refs if not any(t == r or t.startswith(f"{r} (") for t in titles)]
    assert missing == [], f"ARCHITECTURE.md has no heading for {missing}"


def test_nothing_points_outside_the_repository():
    assert "../" not in DOC and "shared/" not in DOC and "MISSION" not in DOC
