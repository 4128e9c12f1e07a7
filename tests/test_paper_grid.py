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
