"""End-to-end stage 1 on the generated dataset: run folder contract, rerun = no retraining, resume
from last.ckpt at the right epoch, DINO run, CLI bad flags (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]

CONTRACT_KEYS = {
    "stage", "method", "method_label", "backbone", "source", "seed", "knn_acc", "knn_acc_init", "linear_probe_acc",
    "final_loss", "epochs", "wall_time_s", "device_seconds", "device", "images_per_s", "peak_mem_mb",
    "backbone_path",
}
BT_KEYS = {"lambd", "cc_diag_mean", "cc_offdiag_rms"}


def _cfg(voc_root, **kw):
    from core.config import PretrainConfig

    d = dict(backbone="vit_nano_patch8", projector=(64, 64), batch_size=8, epochs=2, warmup_epochs=0.5,
             optimizer="adamw", wandb="disabled", device="cpu", gpu_augment=False, dino={"out_dim": 64},
             attn_eval_size=None, data=dict(root=str(voc_root), image_size=32, limit_train=16, limit_val=8))
    d.update(kw)
    return PretrainConfig.from_dict(d)


class EpochRecorder(Callback):
    def __init__(self, crash_at_epoch=None):
        self.epochs = []
        self.crash_at_epoch = crash_at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if self.crash_at_epoch is not None and trainer.current_epoch == self.crash_at_epoch:
            raise RuntimeError("simulated crash")
        self.epochs.append(trainer.current_epoch)


@pytest.mark.slow
def test_pretrain_run_folder_rerun_and_resume(voc_root, tmp_path):
    from core.runs.pretrain import run_pretrain

    cfg = _cfg(voc_root)
    out = tmp_path / "run"
    # 1) crash at the start of epoch 1: a checkpoint of epoch 0 exists, nothing that looks like a result
    crash = EpochRecorder(crash_at_epoch=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretrain(cfg, out, progress=False, callbacks=[crash])
    assert crash.epochs == [0]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "config.json").is_file()
    for f in ("metrics.json", "backbone.pt", "history.csv"):
        assert not (out / f).exists(), f

    # 2) rerun resumes at epoch 1 and finishes
    rec = EpochRecorder()
    m = run_pretrain(cfg, out, progress=False, callbacks=[rec])
    assert rec.epochs == [1]
    assert CONTRACT_KEYS <= set(m)
    assert m["stage"] == "pretrain" and m["method"] == "barlow_twins" and m["epochs"] == 2
    for k in ("knn_acc", "knn_acc_init", "linear_probe_acc"):
        assert 0.0 <= m[k] <= 100.0
    assert m["final_loss"] is not None and m["cc_diag_mean"] is not None
    for k in ("dense_rank", "dense_rank_init"):  # vit_nano's patch tokens are 96 wide
        assert 1.0 <= m[k] <= 96.0, (k, m[k])
    for k in ("dense_local_var", "dense_local_var_init"):
        assert 0.0 < m[k] < 1.0, (k, m[k])
    # DINO's attention-mask Jaccard and the frozen dense linear probe, before and after (3 heads)
    for k in ("attn_jaccard", "attn_jaccard_init", "dense_probe_miou", "dense_probe_miou_init"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 100.0, (k, m[k])
    assert len(m["attn_jaccard_heads"]) == 3 and max(m["attn_jaccard_heads"]) <= m["attn_jaccard"] + 1e-9
    assert json.loads((out / "config.json").read_text())["barlow_twins"]["lambd"] == cfg.barlow_twins.lambd
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    import csv

    with open(out / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert "train/loss_epoch" in hist[0] and "val/knn_acc" in hist[0]
    # the epoch trained before the crash is kept in history.csv
    assert sorted({int(r["epoch"]) for r in hist if r.get("val/knn_acc")}) == [0, 1]
    bb = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    assert bb["arch"] == "vit_nano_patch8" and isinstance(bb["state_dict"], dict)
    assert (out / "figures").is_dir() and any((out / "figures").glob("crosscorr_*.png"))

    # 3) a finished run is returned as is, without training
    mtime = (out / "metrics.json").stat().st_mtime_ns
    rec2 = EpochRecorder(crash_at_epoch=0)
    assert run_pretrain(cfg, out, progress=False, callbacks=[rec2]) == json.loads((out / "metrics.json").read_text())
    assert (out / "metrics.json").stat().st_mtime_ns == mtime

    # 4) backbone.pt is a valid weight source for a later run
    from core.models.registry import create_backbone
    from core.weights import load_source

    b2 = create_backbone("vit_nano_patch8", image_size=32)
    load_source(b2, f"checkpoint:{out / 'backbone.pt'}")
    sd = b2.library_model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in bb["state_dict"].items())


def test_resume_into_folder_with_other_config_is_refused(voc_root, tmp_path):
    from core.errors import ConfigError
    from core.runs.pretrain import run_pretrain

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (out / "config.json").write_text(json.dumps(_cfg(voc_root, barlow_twins={"lambd": 0.5}).to_dict()))
    with pytest.raises(ConfigError, match="different config"):
        run_pretrain(_cfg(voc_root), out, progress=False)


@pytest.mark.slow
def test_dino_run(voc_root, tmp_path):
    from core.runs.pretrain import run_pretrain

    cfg = _cfg(voc_root, method="dino", epochs=1, dino={"out_dim": 64, "local_crops": 2}, backbone="resnet_tiny",
               data=dict(root=str(voc_root), image_size=64, limit_train=16, limit_val=8))
    m = run_pretrain(cfg, tmp_path / "dino", progress=False)
    assert CONTRACT_KEYS <= set(m)
    assert m["method"] == "dino" and m["method_label"] == "DINO" and m["knn_backbone"] == "teacher_backbone"
    assert not BT_KEYS & set(m) and m["final_loss"] is not None  # Barlow Twins' own keys only in its runs
    import math

    assert m["teacher_entropy_uniform"] == pytest.approx(math.log(64))  # the collapse monitors (dino.out_dim 64)
    assert 0.0 <= m["teacher_entropy"] <= m["teacher_entropy_uniform"] + 1e-6 and m["teacher_student_kl"] >= 0.0
    assert (tmp_path / "dino" / "backbone.pt").is_file()
    assert m["attn_jaccard"] is None and m["attn_jaccard_init"] is None  # a CNN has no attention maps
    assert 0.0 <= m["dense_probe_miou"] <= 100.0 and 0.0 <= m["dense_probe_miou_init"] <= 100.0


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--backbone", "nope"], "backbone"),
        (["--lambd", "-1"], "lambd"),
        (["--epochs", "abc"], "epochs"),
        (["--data-root", "/nonexistent/voc"], "/nonexistent/voc"),
        (["--bogus-flag"], "bogus"),
        (["--corrupt-policy", "ignore"], "corrupt_policy"),
        (["--lr", "fast"], "lr"),
    ],
)
def test_cli_bad_flags_one_line_exit_2(tmp_path, flags, needle):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["WANDB_MODE"] = "disabled"
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "pretrain.py"), *flags, "--output", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("twinseg: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()


def test_config_written_before_a_new_field_still_matches(tmp_path):
    """A run folder whose config.json predates a field (here: SegmentConfig.head_channels) matches a config that
    leaves that field at its default, and differs from one that sets it."""
    from core.config import SegmentConfig
    from core.runs.skeleton import config_differences

    cfg = SegmentConfig(evaluation="E2")
    old = cfg.to_dict()
    del old["head_channels"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert config_differences(tmp_path, cfg) == []
    assert config_differences(tmp_path, SegmentConfig(evaluation="E2", head_channels=64)) == ["head_channels"]
