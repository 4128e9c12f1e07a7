"""The paper grid asks only for what exists and trains DINO with the official ViT-S/16 recipe
(github.com/facebookresearch/dino main_dino.py defaults + its README's 300-epoch ViT-S/16 run)."""

from __future__ import annotations

import pytest

from experiments.engine import expand, gridfile


@pytest.fixture(scope="module")
def paper():
    return expand.load_grid(gridfile.resolve_grid("paper"), check_models=False)


def test_every_weight_source_exists_for_its_backbone(paper):
    """No (source, backbone) pair without weights (ViT-S/8 has no supervised ImageNet weights)."""
    from core.weights import check_source

    for t in paper.trials:
        check_source("source", t.config["source"], t.config["backbone"])  # ConfigError if impossible
    assert not [t.id for t in paper.trials if "vit_small_patch8" in t.id and "imagenet" in t.id]
    s8 = {t.config["source"] for t in paper.stage("pretrain") if t.config["backbone"] == "vit_small_patch8"}
    assert s8 == {"random", "dino"}


def test_dino_trials_follow_the_official_recipe(paper):
    dino = [t for t in paper.stage("pretrain") if t.config["method"] == "dino"]
    assert dino
    for t in dino:
        c = t.config
        assert (c["optimizer"], c["lr"], c["min_lr"], c["weight_decay"], c["weight_decay_end"], c["drop_path"]) == (
            "adamw", None, 1e-6, 0.04, 0.4, 0.1), t.id
        assert c["warmup_epochs"] == 10
        o = c["dino"]
        assert (o["out_dim"], o["warmup_teacher_temp"], o["teacher_temp"], o["warmup_teacher_temp_epochs"]) == (
            65536, 0.04, 0.07, 30), t.id
        # the README's 300-epoch ViT-S/16 command: --norm_last_layer false; at batch 128 (official 1024) the
        # teacher momentum main_dino.py advises for small batches (0.9995 at 256), not its 0.996
        assert o["norm_last_layer"] is False and c["batch_size"] == 128, t.id
        assert o["momentum"] == 0.9995, t.id
    # the Barlow Twins trials keep their own recipe (LARS, constant weight decay, no drop path)
    bt = [t.config for t in paper.stage("pretrain") if t.config["method"] == "barlow_twins"]
    assert bt and all((c["optimizer"], c["min_lr"], c["weight_decay_end"], c["drop_path"]) == ("lars", None, None, 0.0)
                      for c in bt)


def test_e2_to_e4_run_on_every_barlow_twins_vit_and_swin(paper):
    """E2, E3 and E4 each consume every Barlow Twins ViT-S/16, ViT-S/8 and Swin-T pretraining run (attention
    fusion on Swin: core/models/heads/fusion.py); the Swin-T runs are Barlow Twins in stage 1."""
    pt = {t.id: t.config for t in paper.stage("pretrain")}
    bt = {i for i, c in pt.items() if c["method"] == "barlow_twins"
          and c["backbone"] in ("vit_small_patch16", "vit_small_patch8", "swin_tiny")}
    assert any(pt[i]["backbone"] == "swin_tiny" for i in bt)
    for ev in ("E2", "E3", "E4"):
        seg = [t for t in paper.stage("segment") if t.config["evaluation"] == ev]
        assert {d for t in seg for d in t.depends_on} == bt, ev
        assert all(t.config["fusion"] == {"E2": "none", "E3": "features", "E4": "affinity"}[ev] for t in seg)


def test_setr_pup_evaluations_train_as_mmseg_and_e1_does_not(paper):
    """E2-E5 (SETR-PUP on ViT-S/16, ViT-S/8, Swin-T) train with mmseg's auxiliary heads and the head's own input
    LayerNorm (configs/_base_/models/setr_pup.py, SETRUPHead.norm); E1 (DeepLabV3 on ResNet-50) gets neither: both
    are refused with another head or a CNN. Every E5 trial, the official-weights one included, has them."""
    seg = paper.stage("segment")
    by_ev: dict = {}
    for t in seg:
        by_ev.setdefault(t.config["evaluation"], []).append(t.config)
    assert set(by_ev) == {"E1", "E2", "E3", "E4", "E5"}
    for ev, cfgs in by_ev.items():
        want = ev != "E1"
        for c in cfgs:
            assert (c["aux_heads"], c["head_input_norm"]) == (want, want), (ev, c["backbone"])
            assert (c["head"] == "setr_pup") == want
    assert {c["backbone"] for ev in ("E2", "E3", "E4") for c in by_ev[ev]} == {
        "vit_small_patch16", "vit_small_patch8", "swin_tiny"}
    assert any(c["source"] == "dino" for c in by_ev["E5"])  # the official DINO weights' trial


# ----------------------------------------------------------------------------- the plan as --dry-run --json prints it
@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """`python experiments/grid.py --grid paper --dry-run --json` (in-process, offline, empty weights folder, no
    Ray): the JSON document on stdout."""
    import contextlib
    import io
    import json

    from experiments.engine import cli
    from tests.test_grid_dry_run import offline_env

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, tmp_path_factory.mktemp("paper-json") / "cwd", gpus=1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(["--grid", "paper", "--dry-run", "--json", "--num-cpus", "64"])
            except SystemExit as e:
                rc = e.code
    doc = json.loads(out.getvalue())
    assert rc == 2 and err.getvalue() == ""  # the data folders and weight files are missing here: problems
    doc["trials_by_id"] = {t["id"]: t for t in doc["trials"]}
    return doc


def _seg(plan, **want) -> list[dict]:
    def get(c, k):
        return c["data"]["dataset"] if k == "dataset" else c[k]

    return [t for t in plan["trials"] if t["stage"] == "segment" and all(get(t["config"], k) == v for k, v in want.items())]


def test_json_plan_lists_the_problems_of_this_machine(plan):
    probs = plan["problems"]
    assert any(p.startswith("paper.yaml: data.root=") and "does not exist" in p for p in probs)
    assert any(p.startswith("paper.yaml: stage2.datasets.coco_stuff.data.root=") and "does not exist" in p
               for p in probs)
    assert any("barlowtwins-imagenet" in p and "resnet50.pth" in p for p in probs)  # the official E1 weights


def test_coco_stuff_runs_e1_to_e5_on_mmseg_s_recipe(plan):
    """A second stage-2 dataset: E1-E5 on COCO-Stuff 164k, 171 classes, mmseg's cocostuff164k pipeline and 80k
    schedule (configs/_base_/datasets/coco-stuff164k.py, schedules/schedule_80k.py); VOC keeps its trainaug 20k."""
    coco = _seg(plan, dataset="coco_stuff")
    assert {t["config"]["evaluation"] for t in coco} == {"E1", "E2", "E3", "E4", "E5"}
    for t in coco:
        c = t["config"]
        assert "-coco_stuff-" in t["id"], t["id"]
        assert (c["data"]["coco_labels"], c["data"]["root"].endswith("data/coco_stuff")) == ("fine", True)
        assert (c["train_split"], c["max_iters"], c["batch_size"], c["schedule"]) == ("train", 80000, 16, "poly")
        assert (c["train_pipeline"], c["crop_size"], c["train_scale"], c["cat_max_ratio"], c["eval_scale"]) == (
            "mmseg", 512, 512, 0.75, 512)
        assert c["epochs"] * (118287 // 16) >= c["max_iters"]  # epochs only bound the run
    voc = _seg(plan, dataset="voc")
    assert voc and all("coco" not in t["id"] for t in voc)
    assert all((t["config"]["train_split"], t["config"]["max_iters"]) == ("trainaug", 20000) for t in voc)
    # E2-E4 on COCO-Stuff: the default lambda's Barlow Twins runs, every source and seed
    pt = {t["id"]: t["config"] for t in plan["trials"] if t["stage"] == "pretrain"}
    want = {i for i, c in pt.items() if c["method"] == "barlow_twins" and c["barlow_twins"]["lambd"] == 0.0051
            and c["backbone"] in ("vit_small_patch16", "vit_small_patch8", "swin_tiny")}
    for ev in ("E2", "E3", "E4"):
        assert {d for t in _seg(plan, dataset="coco_stuff", evaluation=ev) for d in t["depends_on"]} == want, ev


def test_controls_sit_beside_every_e2_backbone_on_both_datasets(plan):
    """E2 from a random initialisation and from supervised ImageNet weights, without Barlow Twins, for every E2
    backbone (ViT-S/8 has no ImageNet weights: random only), 3 seeds, on each dataset."""
    e2_backbones = {t["config"]["backbone"] for t in _seg(plan, evaluation="E2") if t["depends_on"]}
    assert e2_backbones == {"vit_small_patch16", "vit_small_patch8", "swin_tiny"}
    for ds in ("voc", "coco_stuff"):
        ctl = [t for t in _seg(plan, evaluation="E2", dataset=ds) if not t["depends_on"]]
        got = {(t["config"]["backbone"], t["config"]["source"], t["config"]["seed"]) for t in ctl}
        assert got == {(b, s, seed) for b in e2_backbones for s in ("random", "imagenet") for seed in (0, 1, 2)
                       if (b, s) != ("vit_small_patch8", "imagenet")}, ds
        assert all("-control-" in t["id"] for t in ctl)


def test_official_weights_rows_have_three_seeds(plan):
    """E1 from the official Barlow Twins ResNet-50 and E5 from the official DINO ViT-S/16: 3 seeds each, as
    every other row, on each dataset."""
    for ds in ("voc", "coco_stuff"):
        e1 = [t for t in _seg(plan, evaluation="E1", dataset=ds) if not t["depends_on"]]
        assert sorted((t["config"]["backbone"], t["config"]["source"], t["config"]["seed"]) for t in e1) == [
            ("resnet50", "barlowtwins-imagenet", s) for s in (0, 1, 2)], ds
        e5 = [t for t in _seg(plan, evaluation="E5", dataset=ds) if not t["depends_on"]]
        assert sorted((t["config"]["backbone"], t["config"]["source"], t["config"]["seed"]) for t in e5) == [
            ("vit_small_patch16", "dino", s) for s in (0, 1, 2)], ds
    assert "seg-E5-official-vit_small_patch16-dino-s0" in plan["trials_by_id"]  # the id it had with one seed


def test_json_plan_has_the_recipes_fields(plan):
    """DINO pretraining learns its last layer's norm (norm_last_layer false); E2-E5 train with aux heads, E1 not."""
    dino = [t["config"] for t in plan["trials"] if t["stage"] == "pretrain" and t["config"]["method"] == "dino"]
    assert dino and all(c["dino"]["norm_last_layer"] is False for c in dino)
    seg = _seg(plan)
    assert {t["config"]["evaluation"] for t in seg} == {"E1", "E2", "E3", "E4", "E5"}
    assert all(t["config"]["aux_heads"] is (t["config"]["evaluation"] != "E1") for t in seg)
