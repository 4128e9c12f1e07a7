"""Grid files: validation (one-line ConfigError naming file and key path) and expansion."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from experiments import gridspec

BASE = {
    "name": "bad",
    "max_concurrent": 1,
    "retries": 0,
    "data": {"image_size": 32},
    "stage1": {
        "resources": {"cpu": 1, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1, "batch_size": 4},
        "axes": {"backbone": ["vit_nano_patch8", "resnet_tiny"], "lambd": [0.0051], "method": ["barlow_twins"]},
    },
    "stage2": {
        "resources": {"cpu": 1, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1},
        "evaluations": [
            {"evaluation": "E1", "from": {"backbone": "resnet_tiny"}},
            {"evaluation": "E4", "from": {"backbone": "vit_nano_patch8"}},
        ],
    },
}


def _write(tmp_path: Path, doc: dict, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _set(doc: dict, path: str, value):
    d = doc
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    last = keys[-1]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def test_base_grid_is_valid(tmp_path):
    g = gridspec.load_grid(_write(tmp_path, BASE), trials_root=tmp_path / "trials")
    assert [t.id for t in g.trials] == [
        "pt-vit_nano_patch8-random-bt-l0.0051-s0",
        "pt-resnet_tiny-random-bt-l0.0051-s0",
        "seg-E1-from-pt-resnet_tiny-random-bt-l0.0051-s0",
        "seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0",
    ]
    seg = g.by_id()["seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0"]
    assert seg.config["fusion"] == "affinity" and seg.config["head"] == "setr_pup"
    assert seg.config["source"] == f"checkpoint:{(tmp_path / 'trials' / seg.depends_on[0] / 'backbone.pt').as_posix()}"


BAD = [
    # (key path to set, value, expected fragments of the one-line message)
    ("stage3", {"x": 1}, ["bad.yaml: stage3 is not a known key"]),
    ("stage1.settings.epochz", 3, ["bad.yaml: stage1.settings.epochz is not a PretrainConfig field", "did you mean epochs"]),
    ("stage1.axes.lambd", [0.0051, -0.1], ["bad.yaml: stage1.axes.lambd[1]=-0.1 must be >= 0"]),
    ("stage1.settings.epochs", "ten", ["bad.yaml: stage1.settings.epochs='ten' must be an integer"]),
    ("stage1.settings.epochs", -2, ["bad.yaml: stage1.settings.epochs=-2 must be > 0"]),
    ("stage1.axes.backbone", [], ["bad.yaml: stage1.axes.backbone is an empty list"]),
    ("stage1.axes.backbone", ["vit_huge"], ["bad.yaml: stage1.axes.backbone[0]='vit_huge' is not known", "resnet_tiny"]),
    ("stage1.axes.method", ["simclr"], ["bad.yaml: stage1.axes.method[0]='simclr' is not allowed", "barlow_twins"]),
    ("stage1.axes.source", ["imagenet21k"], ["bad.yaml: stage1.axes.source[0]='imagenet21k'", "checkpoint:PATH"]),
    ("stage2.settings.head", "unet", ["bad.yaml: stage2.settings.head='unet' is not known", "setr_pup"]),
    ("stage2.evaluations.0.evaluation", "E3", ["bad.yaml: stage2.evaluations[0]", "resnet_tiny is a CNN"]),
    ("data.image_size", 60, ["bad.yaml: data.image_size=60", "not divisible by patch size 8"]),
    ("stage2.evaluations.1.from", {"backbone": "swin_nano"}, ["bad.yaml: stage2.evaluations[1].from=", "selects no stage-1 trial"]),
    ("stage1.resources.cpu", -1, ["bad.yaml: stage1.resources.cpu=-1 must be > 0"]),
    ("stage2.resources.gpu", "half", ["bad.yaml: stage2.resources.gpu='half' must be a number"]),
    ("retries", -1, ["bad.yaml: retries=-1 must be >= 0"]),
    ("max_concurrent", 0, ["bad.yaml: max_concurrent=0 must be >= 1"]),
    ("wandb", "cloud", ["bad.yaml: wandb='cloud' is not allowed", "offline"]),
    ("stage1.settings.devices", 2, ["bad.yaml: stage1.settings.devices=2", "not supported"]),
    ("stage1.settings.lambd", 0.1, ["bad.yaml: stage1.settings.lambd is set by the grid itself"]),
    ("stage1.exclude", [{"backbone": "swin_nano"}], ["bad.yaml: stage1.exclude[0]=", "matches no stage-1 combination"]),
    ("stage2.evaluations.0.evaluation", "E9", ["bad.yaml: stage2.evaluations[0].evaluation='E9' is not a preset"]),
]


@pytest.mark.parametrize("path,value,fragments", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_grid_one_line_error(tmp_path, path, value, fragments):
    doc = copy.deepcopy(BASE)
    _set(doc, path, value)
    with pytest.raises(ConfigError) as ei:
        gridspec.load_grid(_write(tmp_path, doc))
    msg = str(ei.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^broken\.yaml: line \d+ column \d+ is not valid YAML"):
        gridspec.load_grid(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        gridspec.load_grid(p)
    p.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        gridspec.load_grid(p)


def test_resolve_grid(tmp_path):
    assert gridspec.resolve_grid(None) == gridspec.GRIDS_DIR / "smoke.yaml"
    assert gridspec.resolve_grid("paper") == gridspec.GRIDS_DIR / "paper.yaml"
    with pytest.raises(ConfigError, match=r"--grid smok: unknown grid \(did you mean smoke\?\)"):
        gridspec.resolve_grid("smok")
    with pytest.raises(ConfigError, match="no such grid file"):
        gridspec.resolve_grid(str(tmp_path / "missing.yaml"))
    f = _write(tmp_path, BASE, "mine.yaml")
    assert gridspec.resolve_grid(str(f)) == f


def test_smoke_expansion():
    g = gridspec.load_grid(gridspec.resolve_grid("smoke"), trials_root="/r/trials")
    assert g.name == "smoke" and g.wandb == "offline" and g.retries >= 1
    pre, seg = g.stage("pretrain"), g.stage("segment")
    assert sorted(t.id for t in pre) == sorted([
        "pt-vit_nano_patch8-random-bt-l0.0051-s0",
        "pt-vit_nano_patch8-random-bt-l0.02-s0",
        "pt-resnet_tiny-random-bt-l0.0051-s0",
        "pt-vit_nano_patch8-random-dino-s0",
    ])
    baseline = [t for t in seg if not t.depends_on]
    assert [t.id for t in baseline] == ["seg-E2-random_init-vit_nano_patch8-random-s0"]
    assert baseline[0].config["source"] == "random" and baseline[0].config["fusion"] == "none"
    seg = [t for t in seg if t.depends_on]
    deps = {t.config["evaluation"]: t.depends_on for t in seg}
    assert deps == {
        "E1": ["pt-resnet_tiny-random-bt-l0.0051-s0"],
        "E2": ["pt-vit_nano_patch8-random-bt-l0.0051-s0"],
        "E3": ["pt-vit_nano_patch8-random-bt-l0.0051-s0"],
        "E4": ["pt-vit_nano_patch8-random-bt-l0.0051-s0"],
        "E5": ["pt-vit_nano_patch8-random-dino-s0"],
    }
    for t in seg:
        assert t.id == f"seg-{t.config['evaluation']}-from-{t.depends_on[0]}"
        assert t.config["source"] == f"checkpoint:/r/trials/{t.depends_on[0]}/backbone.pt"
        assert t.config["device"] == "cpu" and t.resources == {"cpu": 1.0, "gpu": 0.0}
    fus = {t.config["evaluation"]: t.config["fusion"] for t in seg}
    assert fus == {"E1": "none", "E2": "none", "E3": "features", "E4": "affinity", "E5": "affinity"}
    dino = g.by_id()["pt-vit_nano_patch8-random-dino-s0"]
    assert dino.config["optimizer"] == "adamw"  # overrides apply
    assert all(t.config["data"]["root"] is None and t.config["data"]["image_size"] == 64 for t in g.trials)
    assert set(g.dependants()["pt-vit_nano_patch8-random-bt-l0.02-s0"]) == set()


def test_paper_expansion_and_overrides(tmp_path):
    g = gridspec.load_grid(gridspec.resolve_grid("paper"), {"data_root": str(tmp_path), "wandb": "disabled",
                                                            "max_concurrent": 3}, check_models=False)
    assert g.wandb == "disabled" and g.max_concurrent == 3
    assert all(t.config["data"]["root"] == str(tmp_path) for t in g.trials)
    assert {t.config["seed"] for t in g.trials} == {0, 1, 2}
    assert any(t.resources["gpu"] == 0.5 for t in g.stage("segment"))
    official = [t for t in g.trials if t.id.startswith("seg-E5-official")]
    assert official and official[0].depends_on == [] and official[0].config["source"] == "dino"
    assert len({t.id for t in g.trials}) == len(g.trials)
