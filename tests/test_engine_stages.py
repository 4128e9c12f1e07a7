"""What differs between stages is read from the stage registry (core/stages.py): the cost estimate's
training images, step budget and head parameters, the trial's config class and run function, and the
grid block each stage's trials come from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.errors import ConfigError
from core.stages import PRETRAIN, SEGMENT, by_grid_key, get_stage, stages, stages_of
from experiments.engine import cost, expand, gridfile, runner

VOC = {"root": "/data/voc", "dataset": "voc"}


def test_training_images_follow_each_stages_split():
    pre = {"data": {**VOC, "ssl_split": "trainaug"}, "train_split": "train"}
    seg = {"data": {**VOC, "ssl_split": "train"}, "train_split": "trainaug"}
    assert PRETRAIN.train_split(pre) == "trainaug" and SEGMENT.train_split(seg) == "trainaug"
    assert cost.train_images(pre, PRETRAIN.name) == (10582, "voc trainaug")
    assert cost.train_images(seg, SEGMENT.name) == (10582, "voc trainaug")
    assert cost.train_images({"data": VOC}, SEGMENT.name) == (1464, "voc train")  # unset: train
    # the SSL images (data.ssl_root) count for the stage that trains on them only
    ssl = {"data": {**VOC, "ssl_root": "/data/imagenet"}}
    assert PRETRAIN.trains_on_ssl_images and not SEGMENT.trains_on_ssl_images
    assert cost.train_images(ssl, PRETRAIN.name)[0] == 1_281_167
    assert cost.train_images(ssl, SEGMENT.name) == (1464, "voc train")


def test_step_budget_and_head_parameters_come_from_the_stage():
    cfg = {"backbone": "resnet_tiny", "epochs": 3, "batch_size": 4, "max_iters": 10, "projector": [8, 16, 32],
           "data": {"synthetic_n_train": 20, "image_size": 64}}
    seg = cost.estimate_trial(SimpleNamespace(id="s", stage=SEGMENT.name, config=cfg,
                                              resources={"cpu": 1, "gpu": 0, "workers": 2}))
    pre = cost.estimate_trial(SimpleNamespace(id="p", stage=PRETRAIN.name, config=cfg, resources={"cpu": 1, "gpu": 0}))
    assert SEGMENT.iterations_field == "max_iters" and PRETRAIN.iterations_field is None
    assert seg.images == 10 * 4 * 2  # steps x batch per worker x workers
    assert pre.images == 3 * 20  # epochs x generated training images (max_iters is not a pretraining budget)
    assert PRETRAIN.head_params(cfg) == 8 * 16 + 16 * 32 and SEGMENT.head_params(cfg) == 0
    params_mb = cost.param_count("resnet_tiny") * cost.BYTES_PER_PARAM / 2**20
    assert seg.peak_mb == pytest.approx(params_mb * cost.CKPT_FACTOR)
    assert pre.peak_mb == pytest.approx((params_mb + (8 * 16 + 16 * 32) * 4 / 2**20) * cost.CKPT_FACTOR)


def test_trial_config_and_run_function_come_from_the_stage():
    from core.config import PretrainConfig, SegmentConfig
    from core.runs.pretrain import run_pretrain
    from core.runs.segment import run_segment

    assert isinstance(runner.build_config(PRETRAIN.name, {}), PretrainConfig)
    assert isinstance(runner.build_config(SEGMENT.name, {}), SegmentConfig)
    assert runner.stage_function(PRETRAIN.name) is run_pretrain and runner.stage_function(SEGMENT.name) is run_segment
    with pytest.raises(ConfigError, match=r"stage='finetune' is not known; choose one of: pretrain, segment"):
        runner.build_config("finetune", {})
    assert stages_of("both") == tuple(stages().values()) and stages_of(SEGMENT.name) == (SEGMENT,)


def test_each_grid_block_expands_into_its_stage():
    g = expand.load_grid(gridfile.resolve_grid("smoke"), check_models=False)
    for key, block in (("stage1", PRETRAIN), ("stage2", SEGMENT)):
        assert by_grid_key(key) is block
        assert block.name in {t.stage for t in g.trials}
    for t in g.trials:
        for dep in t.depends_on:  # a trial depends on the stage its own stage starts from
            assert g.by_id()[dep].stage == get_stage(t.stage).depends_on_stage
        if t.depends_on:
            assert t.config["source"].endswith("/" + get_stage(get_stage(t.stage).depends_on_stage).artifact)
