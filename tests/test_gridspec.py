"""Grid files: validation (one-line ConfigError naming file and key path) and expansion."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from experiments.engine import axes, expand, gridfile

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
    g = expand.load_grid(_write(tmp_path, BASE))
    assert [t.id for t in g.trials] == [
        "pt-vit_nano_patch8-random-bt-l0.0051-s0",
        "pt-resnet_tiny-random-bt-l0.0051-s0",
        "seg-E1-from-pt-resnet_tiny-random-bt-l0.0051-s0",
        "seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0",
    ]
    seg = g.by_id()["seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0"]
    assert seg.config["fusion"] == "affinity" and seg.config["head"] == "setr_pup"
    assert seg.config["source"] == f"checkpoint:trials/{seg.depends_on[0]}/backbone.pt"  # relative to the results folder


BAD = [
    # (key path to set, value, expected fragments of the one-line message)
    ("stage3", {"x": 1}, ["bad.yaml: stage3 is not a known key"]),
    ("stage1.settings.epochz", 3, ["bad.yaml: stage1.settings.epochz is not a PretrainConfig field", "did you mean epochs"]),
    ("stage1.axes.lambd", [0.0051, -0.1], ["bad.yaml: stage1.axes.lambd[1]=-0.1 must be >= 0"]),
    ("stage1.settings.epochs", "ten", ["bad.yaml: stage1.settings.epochs='ten' must be an integer"]),
    ("stage1.settings.epochs", -2, ["bad.yaml: stage1.settings.epochs=-2 ", ">= 1"]),
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
    ("stage1.settings.devices", 0, ["bad.yaml: stage1.settings.devices=0 must be >= 1"]),
    ("stage1.settings.devices", 1.5, ["bad.yaml: stage1.settings.devices=1.5 must be an integer"]),
    ("stage2.settings.devices", "two", ["bad.yaml: stage2.settings.devices='two' must be an integer", "devices: 1"]),
    ("stage1.overrides", [{"match": {"backbone": "resnet_tiny"}, "set": {"devices": -2}}],
     ["bad.yaml: stage1.overrides[0].set.devices=-2 must be > 0"]),
    ("stage1.settings.barlow_twins", {"lambd": 0.1},
     ["bad.yaml: stage1.settings.barlow_twins.lambd is set by the grid itself (an axis)"]),
    ("stage1.settings.dino", {"out_dims": 64}, ["bad.yaml: stage1.settings.dino.out_dims is not a DINOOptions field",
                                               "did you mean out_dim"]),
    ("stage1.settings.dino", {"out_dim": 0}, ["bad.yaml: stage1.settings.dino.out_dim=0 must be > 0"]),
    ("stage1.exclude", [{"backbone": "swin_nano"}], ["bad.yaml: stage1.exclude[0]=", "matches no stage-1 combination"]),
    ("stage2.evaluations.0.evaluation", "E9", ["bad.yaml: stage2.evaluations[0].evaluation='E9' is not a preset"]),
    # the stage-2 dataset axis
    ("stage2.datasets", {"cityscapes": {}}, ["bad.yaml: stage2.datasets.cityscapes is not a known key",
                                             "allowed: voc, coco_stuff"]),
    ("stage2.datasets", {}, ["bad.yaml: stage2.datasets is empty"]),
    ("stage2.datasets", ["voc"], ["bad.yaml: stage2.datasets must be a mapping"]),
    ("stage2.datasets", {"coco_stuff": {"data": {"dataset": "voc"}}},
     ["bad.yaml: stage2.datasets.coco_stuff.data.dataset is the block's key (coco_stuff)"]),
    ("stage2.datasets", {"coco_stuff": {"max_iterz": 5}},
     ["bad.yaml: stage2.datasets.coco_stuff.max_iterz is not a SegmentConfig field", "did you mean max_iters"]),
    ("stage2.datasets", {"coco_stuff": {"train_split": "trainaug"}},
     ["bad.yaml: stage2.datasets.coco_stuff.train_split=trainaug needs data.dataset=voc"]),
    ("stage2.datasets", {"coco_stuff": {"data": {"coco_labels": "medium"}}},
     ["bad.yaml: stage2.datasets.coco_stuff.data.coco_labels='medium' is not allowed", "fine, coarse"]),
    ("stage2.datasets", {"voc": {}, "coco_stuff": {"settings": {"epochs": 1}}},
     ["bad.yaml: stage2.datasets.coco_stuff.settings is not a SegmentConfig field"]),
    ("stage2.evaluations.0.datasets", ["coco_stuff"],
     ["bad.yaml: stage2.evaluations[0].datasets[0]='coco_stuff' is not a dataset of this grid", "choose one of: voc",
      "(declared in data.dataset)"]),
    ("stage2.evaluations.0.datasets", [], ["bad.yaml: stage2.evaluations[0].datasets is an empty list"]),
    ("stage2.evaluations.0.settings", {"data": {"dataset": "coco_stuff"}},
     ["bad.yaml: stage2.evaluations[0].settings.data.dataset is the dataset axis", "stage2.evaluations[0].datasets"]),
    ("stage2.overrides", [{"match": {"datasett": "voc"}, "set": {"lr": 0.01}}],
     ["bad.yaml: stage2.overrides[0].match.datasett is not a known key", "did you mean dataset"]),
    # a standalone entry's axes
    ("stage2.evaluations.0.axes", {"seed": [0, 1]},
     ["bad.yaml: stage2.evaluations[0].axes applies to from: none only"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none", "axes": {"method": ["dino"]}},
     ["bad.yaml: stage2.evaluations[1].axes.method is not a known key", "allowed: backbone, source, seed"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none", "axes": {"seed": [0, 0]}},
     ["bad.yaml: stage2.evaluations[1].axes.seed[1]=0 is listed twice"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none", "axes": {"seed": []}},
     ["bad.yaml: stage2.evaluations[1].axes.seed is an empty list"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none", "axes": {"seed": [[0, 1]]}},
     ["bad.yaml: stage2.evaluations[1].axes.seed[0]=[0, 1] must be a single value"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none", "settings": {"seed": 1}, "axes": {"seed": [0]}},
     ["bad.yaml: stage2.evaluations[1].settings.seed is also given by stage2.evaluations[1].axes.seed"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none",
                              "axes": {"backbone": "vit_nano_patch8", "seed": [0, -1]}},
     ["bad.yaml: stage2.evaluations[1].axes.seed[1]=-1"]),
    ("stage2.evaluations.1", {"evaluation": "E2", "from": "none", "axes": {"source": ["imagenet21k"]}},
     ["bad.yaml: stage2.evaluations[1].axes.source[0]='imagenet21k'", "checkpoint:PATH"]),
]


@pytest.mark.parametrize("path,value,fragments", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_grid_one_line_error(tmp_path, path, value, fragments):
    doc = copy.deepcopy(BASE)
    _set(doc, path, value)
    with pytest.raises(ConfigError) as ei:
        expand.load_grid(_write(tmp_path, doc))
    msg = str(ei.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^broken\.yaml: line \d+ column \d+ is not valid YAML"):
        expand.load_grid(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        expand.load_grid(p)
    p.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        expand.load_grid(p)


def test_resolve_grid(tmp_path):
    assert gridfile.resolve_grid(None) == gridfile.GRIDS_DIR / "smoke.yaml"
    assert gridfile.resolve_grid("paper") == gridfile.GRIDS_DIR / "paper.yaml"
    with pytest.raises(ConfigError, match=r"--grid smok: unknown grid \(did you mean smoke\?\)"):
        gridfile.resolve_grid("smok")
    with pytest.raises(ConfigError, match="no such grid file"):
        gridfile.resolve_grid(str(tmp_path / "missing.yaml"))
    f = _write(tmp_path, BASE, "mine.yaml")
    assert gridfile.resolve_grid(str(f)) == f


def test_smoke_expansion():
    g = expand.load_grid(gridfile.resolve_grid("smoke"))
    assert g.name == "smoke" and g.wandb == "offline" and g.retries >= 1
    pre, seg = g.stage("pretrain"), g.stage("segment")
    assert sorted(t.id for t in pre) == sorted([
        "pt-vit_nano_patch8-random-bt-l0.0051-s0",
        "pt-vit_nano_patch8-random-bt-l0.02-s0",
        "pt-resnet_tiny-random-bt-l0.0051-s0",
        "pt-vit_nano_patch8-random-dino-s0",
        "pt-vit_nano_patch8-random-vicreg-s0",
    ])
    baseline = [t for t in seg if not t.depends_on]
    assert [t.id for t in baseline] == ["seg-E2-random_init-vit_nano_patch8-random-s0"]
    assert baseline[0].config["source"] == "random" and baseline[0].config["fusion"] == "none"
    seg = [t for t in seg if t.depends_on]
    deps: dict[str, list[str]] = {}
    for t in seg:
        deps.setdefault(t.config["evaluation"], []).extend(t.depends_on)
    assert {k: sorted(v) for k, v in deps.items()} == {
        "E1": ["pt-resnet_tiny-random-bt-l0.0051-s0"],
        # E2 on the Barlow Twins ViT of every lambda (the lambda sweep's segmentation line)
        "E2": ["pt-vit_nano_patch8-random-bt-l0.0051-s0", "pt-vit_nano_patch8-random-bt-l0.02-s0"],
        "E3": ["pt-vit_nano_patch8-random-bt-l0.0051-s0"],
        "E4": ["pt-vit_nano_patch8-random-bt-l0.0051-s0"],
        "E5": ["pt-vit_nano_patch8-random-dino-s0"],
    }
    for t in seg:
        assert t.id == f"seg-{t.config['evaluation']}-from-{t.depends_on[0]}"
        assert t.config["source"] == f"checkpoint:trials/{t.depends_on[0]}/backbone.pt"
        assert t.config["device"] == "cpu" and t.resources == {"cpu": 1.0, "gpu": 0.0}
    fus = {t.config["evaluation"]: t.config["fusion"] for t in seg}
    assert fus == {"E1": "none", "E2": "none", "E3": "features", "E4": "affinity", "E5": "affinity"}
    # the SETR-PUP trials (the random-init baseline too) run a narrower head on the CPU; DeepLabV3 (E1) has no width
    width = {t.id: t.config.get("head_channels") for t in g.stage("segment")}
    assert {k: v for k, v in width.items() if "-E1-" not in k} == {k: 128 for k in width if "-E1-" not in k}
    assert [v for k, v in width.items() if "-E1-" in k] == [None]
    dino = g.by_id()["pt-vit_nano_patch8-random-dino-s0"]
    assert dino.config["optimizer"] == "adamw"  # overrides apply
    assert all(t.config["data"]["root"] is None and t.config["data"]["image_size"] == 64 for t in g.trials)
    assert set(g.dependants()["pt-vit_nano_patch8-random-bt-l0.02-s0"]) == {
        "seg-E2-from-pt-vit_nano_patch8-random-bt-l0.02-s0"}


def test_paper_expansion_and_overrides(tmp_path):
    g = expand.load_grid(gridfile.resolve_grid("paper"), {"data_root": str(tmp_path), "wandb": "disabled",
                                                            "max_concurrent": 3}, check_models=False)
    assert g.wandb == "disabled" and g.max_concurrent == 3
    # --data-root is VOC's folder; COCO-Stuff (another stage-2 dataset) keeps its own
    assert all(t.config["data"]["root"] == str(tmp_path) for t in g.trials if t.config["data"]["dataset"] == "voc")
    coco = [t for t in g.trials if t.config["data"]["dataset"] == "coco_stuff"]
    assert coco and all(t.config["data"]["root"] == "data/coco_stuff" for t in coco)
    assert {t.config["seed"] for t in g.trials} == {0, 1, 2}
    assert any(t.resources["gpu"] == 0.5 for t in g.stage("segment"))
    official = [t for t in g.trials if t.id.startswith("seg-E5-official")]
    assert official and official[0].depends_on == [] and official[0].config["source"] == "dino"
    assert len({t.id for t in g.trials}) == len(g.trials)


# ----------------------------------------------------------------------------- devices > 1 (Ray Train + DDP)
def test_devices_run_as_ray_train_workers(tmp_path):
    """devices: N > 1 is accepted: the trial's resources are per worker and carry workers: N; only
    the trials it applies to (here through an override) are DDP trials."""
    doc = copy.deepcopy(BASE)
    doc["stage1"]["settings"]["devices"] = 2
    doc["stage1"]["overrides"] = [{"match": {"backbone": "resnet_tiny"}, "set": {"devices": 1}}]
    doc["stage2"]["evaluations"][1]["settings"] = {"devices": 3}
    g = expand.load_grid(_write(tmp_path, doc))
    res = {t.id: t.resources for t in g.trials}
    assert res["pt-vit_nano_patch8-random-bt-l0.0051-s0"] == {"cpu": 1.0, "gpu": 0.0, "workers": 2}
    assert res["pt-resnet_tiny-random-bt-l0.0051-s0"] == {"cpu": 1.0, "gpu": 0.0}
    assert res["seg-E1-from-pt-resnet_tiny-random-bt-l0.0051-s0"] == {"cpu": 1.0, "gpu": 0.0}
    assert res["seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0"] == {"cpu": 1.0, "gpu": 0.0, "workers": 3}
    assert g.by_id()["pt-vit_nano_patch8-random-bt-l0.0051-s0"].config["devices"] == 2


@pytest.mark.parametrize("where,gpu,fragments", [
    ("stage1.settings", 0.5, ["bad.yaml: stage1.resources.gpu=0.5 is a fraction of a GPU",
                              "stage1.settings.devices=2 runs the trial as 2 DDP workers",
                              "set stage1.resources.gpu: 1 (GPUs per worker) or devices: 1"]),
    ("stage1.overrides", 0.25, ["bad.yaml: stage1.resources.gpu=0.25 is a fraction",
                                "stage1.overrides[0].set.devices=2"]),
    ("stage2.evaluations", 0.5, ["bad.yaml: stage2.resources.gpu=0.5 is a fraction",
                                 "stage2.evaluations[1].settings.devices=2"]),
    ("stage1.settings", 2, ["bad.yaml: stage1.resources.gpu=2 is per worker with stage1.settings.devices=2",
                            "set stage1.resources.gpu: 1 (2 workers x 1 GPU)"]),
    ("stage1.settings", 1, ["bad.yaml: stage1.resources.gpu=1 reserves a GPU per worker but "
                            "stage1.settings.device='cpu' trains the 2 DDP workers on the CPU",
                            "set stage1.resources.gpu: 0 (CPU workers, gloo) or device: auto"]),
])
def test_devices_with_fractional_gpu_is_one_line_error(tmp_path, where, gpu, fragments):
    doc = copy.deepcopy(BASE)
    stage = where.split(".")[0]
    doc[stage]["resources"] = {"cpu": 1, "gpu": gpu}
    if where == "stage1.settings":
        doc["stage1"]["settings"]["devices"] = 2
    elif where == "stage1.overrides":
        doc["stage1"]["overrides"] = [{"match": {"backbone": "vit_nano_patch8"}, "set": {"devices": 2}}]
    else:
        doc["stage2"]["evaluations"][1]["settings"] = {"devices": 2}
    with pytest.raises(ConfigError) as ei:
        expand.load_grid(_write(tmp_path, doc), check_models=False)
    msg = str(ei.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_cluster_check_counts_every_worker(tmp_path, monkeypatch):
    """The pre-start resource check needs N workers x per-worker resources (+ the driver's CPU)."""
    import ray

    from experiments.engine.checks import cluster_fit_problem
    from experiments.engine.ray_backend import check_cluster_fits

    doc = copy.deepcopy(BASE)
    doc["stage1"]["resources"] = {"cpu": 2, "gpu": 1}
    doc["stage1"]["settings"]["devices"] = 4
    doc["stage1"]["settings"]["device"] = "auto"
    g = expand.load_grid(_write(tmp_path, doc), check_models=False)
    assert cluster_fit_problem(g, cpus=9, gpus=4) is None
    gpu = cluster_fit_problem(g, cpus=64, gpus=2)
    assert gpu.startswith("stage1: trial pt-vit_nano_patch8-random-bt-l0.0051-s0 runs devices=4 workers x "
                          "stage1.resources.gpu=1 = 4 GPU(s) but the Ray cluster has 2; lower settings.devices")
    cpu = cluster_fit_problem(g, cpus=8, gpus=4)  # 4 x 2 CPUs + 0.01 for the driver
    assert "x stage1.resources.cpu=2 (+0.01 for its driver) = 8.01 CPU(s) but the Ray cluster has 8" in cpu
    assert "lower stage1.resources.cpu or settings.devices, or add CPUs (--num-cpus)" in cpu
    # single-device trials keep their own check
    one = copy.deepcopy(BASE)
    one["stage2"]["resources"] = {"cpu": 4, "gpu": 0}
    g1 = expand.load_grid(_write(tmp_path, one, "one.yaml"), check_models=False)
    assert cluster_fit_problem(g1, cpus=2, gpus=0).startswith("stage2.resources.cpu=4 but the Ray cluster has 2 CPU(s)")
    # the driver's check: one line prefixed with the grid file
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(ConfigError) as ei:
        check_cluster_fits(g, strict=True)
    assert str(ei.value).startswith("bad.yaml: stage1: trial ") and "\n" not in str(ei.value)


def test_paper_grid_documents_devices():
    """paper.yaml shows a commented devices: 4 example; it does not change the expansion."""
    text = gridfile.resolve_grid("paper").read_text()
    assert "devices: 4" in text
    g = expand.load_grid(gridfile.resolve_grid("paper"), check_models=False)
    assert all("workers" not in t.resources for t in g.trials)


def test_axes_are_declared_once_and_method_axes_follow_their_method(tmp_path):
    """The stage-1 axes come from one declaration; a method's own axis (lambd) applies to it alone."""
    declared = axes.stage1_axes()
    assert list(declared) == ["backbone", "source", "method", "lambd", "seed"]
    assert declared["lambd"].path == ("barlow_twins", "lambd") and declared["lambd"].method == "barlow_twins"
    doc = copy.deepcopy(BASE)
    doc["stage1"]["axes"] = {"backbone": ["vit_nano_patch8"], "lambd": [0.0051, 0.02],
                             "method": ["barlow_twins", "dino", "vicreg"]}
    doc["stage1"]["settings"]["dino"] = {"out_dim": 32}
    doc.pop("stage2")
    g = expand.load_grid(_write(tmp_path, doc))
    ids = sorted(t.id for t in g.trials)
    assert ids == ["pt-vit_nano_patch8-random-bt-l0.0051-s0", "pt-vit_nano_patch8-random-bt-l0.02-s0",
                   "pt-vit_nano_patch8-random-dino-s0", "pt-vit_nano_patch8-random-vicreg-s0"]
    by = g.by_id()
    assert by["pt-vit_nano_patch8-random-bt-l0.02-s0"].config["barlow_twins"]["lambd"] == 0.02
    dino = by["pt-vit_nano_patch8-random-dino-s0"]
    assert dino.labels["lambd"] is None and dino.config["dino"]["out_dim"] == 32
    assert dino.config["barlow_twins"]["lambd"] == 0.0051  # not its axis: the default stays


# ----------------------------------------------------------------------------- per-trial problems, collected
def test_collect_lists_every_per_trial_problem(tmp_path):
    """collect=True: independent per-trial problems are all listed (identical ones merged into one
    line naming the trials); without it the first is raised as before."""
    doc = copy.deepcopy(BASE)
    doc["stage1"]["axes"]["seed"] = [0, 1, 2]
    doc["stage2"]["evaluations"] += [
        {"evaluation": "E3", "from": {"backbone": "resnet_tiny"}},   # attention fusion on a CNN, 3 seeds
        {"evaluation": "E4", "from": {"backbone": "resnet_tiny"}},
        {"evaluation": "E5", "from": "none", "settings": {"backbone": "vit_nano_patch8", "source": "dino"}},
    ]
    g = expand.load_grid(_write(tmp_path, doc), collect=True)
    lines = [p.line for p in g.problems]
    assert len(lines) == 3, lines
    e3, e4, e5 = lines
    assert e3.startswith("bad.yaml: stage2.evaluations[2] (3 trials: seg-E3-from-pt-resnet_tiny-random-bt-l0.0051-s0, "
                         "seg-E3-from-pt-resnet_tiny-random-bt-l0.0051-s1, +1 more): evaluation E3 on backbone "
                         "resnet_tiny: fusion='features' needs a transformer backbone")
    assert e4.startswith("bad.yaml: stage2.evaluations[3] (3 trials: ") and "resnet_tiny is a CNN" in e4
    assert e5.startswith("bad.yaml: stage2.evaluations[4].settings.source='dino' (trial seg-E5-vit_nano_patch8-dino-s0): "
                         "source dino has no weights for backbone vit_nano_patch8")
    assert all("\n" not in ln for ln in lines)
    ids = {t.id for t in g.trials}
    assert "seg-E3-from-pt-resnet_tiny-random-bt-l0.0051-s2" in ids  # in the plan (marked), not dropped
    assert "seg-E5-vit_nano_patch8-dino-s0" not in ids and g.left_out == ["seg-E5-vit_nano_patch8-dino-s0"]
    with pytest.raises(ConfigError) as ei:  # the normal API: the first problem, one line
        expand.load_grid(_write(tmp_path, doc))
    assert str(ei.value).startswith("bad.yaml: stage2.evaluations[2] (trial seg-E3-from-pt-resnet_tiny-random-bt-l0.0051-s0): ")


def test_pair_without_weights_is_one_problem_and_not_scheduled(tmp_path):
    """A (source, backbone) pair for which no weights exist (core.weights.WEIGHT_SPECS) is reported
    once, with its trials and the segmentation trials that would consume them, and left out."""
    doc = copy.deepcopy(BASE)
    doc["stage1"]["axes"] = [
        {"backbone": ["vit_nano_patch8", "resnet_tiny"], "lambd": [0.0051], "method": ["barlow_twins"]},
        {"backbone": ["vit_nano_patch8"], "source": ["imagenet"], "lambd": [0.0051, 0.02], "method": ["barlow_twins"]},
    ]
    g = expand.load_grid(_write(tmp_path, doc), check_models=False, collect=True)
    assert len(g.problems) == 1
    line = g.problems[0].line
    assert line.startswith("bad.yaml: stage1.axes[1].source[0]='imagenet' x stage1.axes[1].backbone[0]='vit_nano_patch8' "
                           "(2 trials: pt-vit_nano_patch8-imagenet-bt-l0.0051-s0, pt-vit_nano_patch8-imagenet-bt-l0.02-s0; "
                           "and 2 segmentation trial(s) from them): source imagenet has no weights for backbone "
                           "vit_nano_patch8 (no such weight file exists, sources for vit_nano_patch8: random, checkpoint:PATH)")
    assert line.endswith("remove the pair from stage1.axes[1], or add {backbone: vit_nano_patch8, source: imagenet} "
                         "to stage1.exclude")
    assert not any("imagenet" in t.id for t in g.trials)
    assert sorted(g.left_out) == sorted([
        "pt-vit_nano_patch8-imagenet-bt-l0.0051-s0", "pt-vit_nano_patch8-imagenet-bt-l0.02-s0",
        "seg-E4-from-pt-vit_nano_patch8-imagenet-bt-l0.0051-s0", "seg-E4-from-pt-vit_nano_patch8-imagenet-bt-l0.02-s0"])
    with pytest.raises(ConfigError, match=r"^bad\.yaml: stage1\.axes\[1\]\.source\[0\]='imagenet' x "):
        expand.load_grid(_write(tmp_path, doc), check_models=False)
    # the fix it names works; a from: that selects only such trials is no extra error
    doc["stage1"]["exclude"] = [{"backbone": "vit_nano_patch8", "source": "imagenet"}]
    assert expand.load_grid(_write(tmp_path, doc), check_models=False, collect=True).problems == []
    only = copy.deepcopy(BASE)
    only["stage1"]["axes"]["source"] = ["imagenet"]
    only["stage1"]["axes"]["backbone"] = ["vit_nano_patch8"]
    only["stage2"]["evaluations"] = only["stage2"]["evaluations"][1:]
    g = expand.load_grid(_write(tmp_path, only), check_models=False, collect=True)
    assert g.trials == [] and len(g.problems) == 1 and "and 1 segmentation trial(s) from them" in g.problems[0].line


def test_cluster_fit_problems_lists_every_stage(tmp_path):
    from experiments.engine.checks import cluster_fit_problems

    doc = copy.deepcopy(BASE)
    doc["stage1"]["resources"] = {"cpu": 4, "gpu": 1}
    doc["stage1"]["settings"]["device"] = "auto"
    doc["stage2"]["resources"] = {"cpu": 8, "gpu": 0.5}
    doc["stage2"]["settings"]["device"] = "auto"
    g = expand.load_grid(_write(tmp_path, doc), check_models=False)
    found = cluster_fit_problems(g, cpus=2, gpus=0, cluster="this machine (local start)")
    assert found == [
        "stage1.resources.gpu=1 but this machine (local start) has 0 GPU(s); use --grid smoke (CPU) or run on a GPU machine / cluster",
        "stage1.resources.cpu=4 but this machine (local start) has 2 CPU(s); lower stage1.resources.cpu or add CPUs (--num-cpus)",
        "stage2.resources.gpu=0.5 but this machine (local start) has 0 GPU(s); use --grid smoke (CPU) or run on a GPU machine / cluster",
        "stage2.resources.cpu=8 but this machine (local start) has 2 CPU(s); lower stage2.resources.cpu or add CPUs (--num-cpus)",
    ]


def test_image_size_problem_is_one_line_for_both_stages(tmp_path):
    """A size the backbone refuses is located at data.image_size once, naming the pretraining and
    the segmentation trials it breaks."""
    doc = copy.deepcopy(BASE)
    doc["data"]["image_size"] = 36
    g = expand.load_grid(_write(tmp_path, doc), collect=True)
    assert len(g.problems) == 1
    line = g.problems[0].line
    assert line.startswith("bad.yaml: data.image_size=36 (2 trials: pt-vit_nano_patch8-random-bt-l0.0051-s0, "
                           "seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0): does not fit backbone vit_nano_patch8: ")
    assert "patch size 8" in line


# ----------------------------------------------------------------------------- the stage-2 dataset axis
def _two_datasets() -> dict:
    doc = copy.deepcopy(BASE)
    doc["data"]["root"] = "/somewhere/voc"
    doc["stage2"]["datasets"] = {"voc": {"epochs": 2}, "coco_stuff": {"epochs": 3, "data": {"coco_labels": "fine"}}}
    doc["stage2"]["overrides"] = [{"match": {"dataset": "coco_stuff", "evaluation": "E4"}, "set": {"lr": 0.01}}]
    doc["stage2"]["evaluations"].append({"evaluation": "E2", "tag": "control", "from": "none", "datasets": ["coco_stuff"],
                                         "axes": {"backbone": ["vit_nano_patch8", "swin_nano"], "seed": [0, 1]}})
    return doc


def test_dataset_axis_ids_labels_and_settings(tmp_path):
    """Each stage-2 entry runs on every declared dataset (or those it lists); the grid's data.dataset (voc) keeps
    the ids it has without the block, another dataset is part of the id; labels and configs carry the dataset."""
    g = expand.load_grid(_write(tmp_path, _two_datasets()))
    pre_vit, pre_res = "pt-vit_nano_patch8-random-bt-l0.0051-s0", "pt-resnet_tiny-random-bt-l0.0051-s0"
    assert [t.id for t in g.stage("segment")] == [
        f"seg-E1-from-{pre_res}", f"seg-E4-from-{pre_vit}",
        f"seg-E1-coco_stuff-from-{pre_res}", f"seg-E4-coco_stuff-from-{pre_vit}",
        "seg-E2-control-coco_stuff-vit_nano_patch8-random-s0", "seg-E2-control-coco_stuff-vit_nano_patch8-random-s1",
        "seg-E2-control-coco_stuff-swin_nano-random-s0", "seg-E2-control-coco_stuff-swin_nano-random-s1",
    ]
    by = g.by_id()
    voc, coco = by[f"seg-E4-from-{pre_vit}"], by[f"seg-E4-coco_stuff-from-{pre_vit}"]
    assert voc.labels["dataset"] == "voc" and coco.labels["dataset"] == "coco_stuff"
    assert (voc.config["data"]["dataset"], voc.config["data"]["root"], voc.config["epochs"]) == ("voc", "/somewhere/voc", 2)
    # another dataset does not inherit the VOC folder (none: its generated tree), and gets its own settings
    assert (coco.config["data"]["dataset"], coco.config["data"]["root"], coco.config["data"]["coco_labels"],
            coco.config["epochs"]) == ("coco_stuff", None, "fine", 3)
    assert coco.config["data"]["image_size"] == 32  # the rest of the grid's data is shared
    assert coco.depends_on == voc.depends_on == [pre_vit]
    # overrides match the dataset
    assert coco.config["lr"] == 0.01 and voc.config["lr"] != 0.01
    assert by[f"seg-E1-coco_stuff-from-{pre_res}"].config["lr"] != 0.01
    # a standalone entry's axes: their product, no dependency, the tag in the labels
    ctl = by["seg-E2-control-coco_stuff-swin_nano-random-s1"]
    assert (ctl.config["backbone"], ctl.config["seed"], ctl.config["source"], ctl.depends_on) == (
        "swin_nano", 1, "random", [])
    assert ctl.labels == {"evaluation": "E2", "from": None, "dataset": "coco_stuff", "tag": "control"}


def test_grid_without_datasets_keeps_its_ids_and_labels_the_dataset(tmp_path):
    g = expand.load_grid(_write(tmp_path, BASE))
    assert all(t.labels["dataset"] == "voc" and "coco" not in t.id for t in g.stage("segment"))
    doc = copy.deepcopy(BASE)
    doc["data"]["dataset"] = "coco_stuff"  # a grid on COCO-Stuff alone: its default dataset, no id token
    g = expand.load_grid(_write(tmp_path, doc))
    assert [t.id for t in g.stage("segment")] == ["seg-E1-from-pt-resnet_tiny-random-bt-l0.0051-s0",
                                                  "seg-E4-from-pt-vit_nano_patch8-random-bt-l0.0051-s0"]
    assert all(t.labels["dataset"] == "coco_stuff" for t in g.stage("segment"))
    # with a datasets block, stage2.settings may not name a dataset
    doc = _two_datasets()
    doc["stage2"]["settings"]["data"] = {"dataset": "voc"}
    with pytest.raises(ConfigError, match=r"^bad\.yaml: stage2\.settings\.data\.dataset is set by the keys of "
                                          r"stage2\.datasets"):
        expand.load_grid(_write(tmp_path, doc))


def test_max_trials_counts_every_dataset_and_standalone_combination(tmp_path):
    doc = _two_datasets()
    doc["max_trials"] = 9  # 2 pretraining + 2 x 2 from stage 1 + 4 controls = 10
    with pytest.raises(ConfigError, match=r"max_trials=9 is exceeded: stage1 \(2\) \+ stage2 \(8\) expand to 10"):
        expand.load_grid(_write(tmp_path, doc))
    doc["max_trials"] = 10
    assert len(expand.load_grid(_write(tmp_path, doc)).trials) == 10
