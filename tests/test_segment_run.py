"""Stage 2 end to end: run_segment's run folder contract, resume/skip, weight sources, frozen mode,
sliding-window inference, and the CLI's one-line errors. CPU, tiny backbones, generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import SegmentConfig
from core.errors import ConfigError, WeightsError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "segment.py"
CONTRACT_KEYS = {"stage", "evaluation", "backbone", "head", "fusion", "source", "mode", "seed", "mIoU", "aAcc",
                 "mAcc", "IoU", "class_names", "epochs", "wall_time_s", "device_seconds", "device",
                 "images_per_s", "peak_mem_mb"}


def _cfg(root, **kw) -> SegmentConfig:
    d = {"backbone": "vit_nano_patch8", "head": "linear", "epochs": 2, "batch_size": 8, "lr": 3e-3,
         "wandb": "disabled", "device": "cpu",
         "data": {"root": str(root), "image_size": 32, "limit_train": 16, "limit_val": 8}}
    data = kw.pop("data", {})
    d.update(kw)
    d["data"].update(data)
    return SegmentConfig.from_dict(d)


def _export(name: str, path: Path, seed: int) -> dict:
    """A stage-1 style backbone.pt ({"arch", "library_arch", "state_dict"}) of a random `name` backbone."""
    from core.models.registry import create_backbone
    from core.weights import export_backbone

    torch.manual_seed(seed)
    bb = create_backbone(name, image_size=32)
    export_backbone(bb, path)
    return {k: v.clone() for k, v in bb.state_dict().items()}


def test_run_folder_contract_and_rerun_skips(tmp_path, voc_root, monkeypatch):
    from core.runs import segment as seg

    out = tmp_path / "run"
    m = seg.run_segment(_cfg(voc_root, keep_checkpoints=True), out, progress=False)
    for f in ("config.json", "history.csv", "metrics.json", "model.pt", "checkpoints/last.ckpt"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == m
    assert CONTRACT_KEYS <= set(m)
    assert m["stage"] == "segment" and m["mode"] == "finetune" and m["source"] == "random" and m["epochs"] == 2
    assert 0.0 <= m["mIoU"] <= 100.0 and 0.0 <= m["aAcc"] <= 100.0
    assert len(m["IoU"]) == 21 and len(m["class_names"]) == 21 and m["class_names"][0] == "background"
    assert SegmentConfig.from_dict(json.loads((out / "config.json").read_text())).head == "linear"
    hist = (out / "history.csv").read_text().splitlines()
    assert "val/mIoU" in hist[0] and "train/loss_epoch" in hist[0]
    assert sum(1 for r in hist[1:] if r.split(",")[0] in ("0", "1")) >= 2
    sd = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert sd["arch"] == "vit_nano_patch8" and any(k.startswith("backbone.") for k in sd["state_dict"])

    # finished folder: returns metrics.json without building a trainer
    def boom(*a, **k):
        raise AssertionError("a finished run must not train again")

    with monkeypatch.context() as mp:
        import core.runs.skeleton as skeleton

        mp.setattr(skeleton, "make_trainer", boom)
        assert seg.run_segment(_cfg(voc_root), out, progress=False) == on_disk

    # interrupted after training (no metrics.json): resumes from last.ckpt, only re-validates
    (out / "metrics.json").unlink()
    (out / "model.pt").unlink()
    m2 = seg.run_segment(_cfg(voc_root), out, progress=False)
    assert m2["mIoU"] == pytest.approx(m["mIoU"]) and m2["IoU"] == pytest.approx(m["IoU"])
    assert (out / "metrics.json").is_file() and (out / "model.pt").is_file()
    hist2 = (out / "history.csv").read_text().splitlines()
    assert hist2[1] == hist[1] and len(hist2) >= len(hist)  # rows logged before the resume are kept


def test_checkpoint_source_frozen_slide(tmp_path, voc_root):
    """checkpoint:PATH (stage-1 backbone.pt) is loaded; frozen mode never changes it; slide inference runs."""
    from core.runs.segment import run_segment

    ckpt = tmp_path / "stage1" / "backbone.pt"
    ref = _export("vit_nano_patch8", ckpt, seed=123)
    out = tmp_path / "run"
    m = run_segment(_cfg(voc_root, source=f"checkpoint:{ckpt}", mode="frozen", epochs=1, inference="slide",
                         slide_crop=16, slide_stride=8), out, progress=False)
    assert m["mode"] == "frozen" and m["source"] == f"checkpoint:{ckpt}" and m["inference"] == "slide"
    assert 0.0 <= m["mIoU"] <= 100.0 and len(m["IoU"]) == 21
    sd = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert ref, "empty reference state dict"
    for k, v in ref.items():
        assert torch.equal(sd[f"backbone.{k}"], v), f"backbone weight {k} changed (or was not loaded)"
    # the head did train
    assert any(k.startswith("head.") for k in sd)


def test_checkpoint_of_another_architecture_is_one_line_and_writes_nothing(tmp_path, voc_root):
    from core.runs.segment import run_segment

    ckpt = tmp_path / "resnet" / "backbone.pt"
    _export("resnet_tiny", ckpt, seed=0)
    out = tmp_path / "run"
    with pytest.raises(WeightsError) as e:
        run_segment(_cfg(voc_root, source=f"checkpoint:{ckpt}"), out, progress=False)
    assert "\n" not in str(e.value) and "resnet_tiny" in str(e.value)
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_frozen_cnn_keeps_batchnorm_statistics():
    """Frozen: backbone in eval whatever .train() says, no grads, BN running stats untouched."""
    from core.methods.segmentation import SegmentationMethod

    cfg = SegmentConfig.from_dict({"backbone": "resnet_tiny", "head": "deeplabv3", "mode": "frozen",
                                   "wandb": "disabled", "data": {"image_size": 32}})
    m = SegmentationMethod(cfg, 21, [str(i) for i in range(21)])
    m.train()
    assert not m.backbone.training and m.model.head.training
    assert all(not p.requires_grad for p in m.backbone.parameters())
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    groups = m.param_groups()
    assert groups and not any(g["name"].startswith("backbone") for g in groups)
    opt = torch.optim.AdamW(groups)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32))
    loss = m.training_step((x, y), 0)
    loss.backward()
    opt.step()
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_finetune_param_groups_scale_backbone_lr():
    from core.methods.segmentation import SegmentationMethod

    cfg = SegmentConfig.from_dict({"backbone": "vit_nano_patch8", "head": "linear", "lr": 1e-3,
                                   "backbone_lr_scale": 0.1, "data": {"image_size": 32}})
    m = SegmentationMethod(cfg, 21, [str(i) for i in range(21)])
    lrs = {g["name"]: g["lr"] for g in m.param_groups()}
    assert lrs["head"] == pytest.approx(1e-3) and lrs["backbone"] == pytest.approx(1e-4)


def test_slide_inference_equals_whole_when_one_window():
    from core.methods.segmentation import SegmentationMethod

    cfg = SegmentConfig.from_dict({"backbone": "vit_nano_patch8", "head": "linear", "data": {"image_size": 32},
                                   "inference": "slide", "slide_crop": 32, "slide_stride": 16})
    m = SegmentationMethod(cfg, 21, [str(i) for i in range(21)]).eval()
    x = torch.randn(2, 3, 32, 32)
    slide = m.predict_logits(x)
    whole = m.model(x)
    assert slide.shape == (2, 21, 32, 32) and torch.allclose(slide, whole, atol=1e-5)
    cfg2 = cfg.replace(slide_crop=16, slide_stride=8)
    m2 = SegmentationMethod(cfg2, 21, [str(i) for i in range(21)]).eval()
    assert m2.predict_logits(torch.randn(1, 3, 40, 40)).shape == (1, 21, 40, 40)


# --------------------------------------------------------------------------- CLI
def _cli(args, cwd=REPO) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    env.pop("TWINSEG_TRACEBACK", None)
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, voc_root):
    ckpt = tmp_path / "resnet" / "backbone.pt"
    _export("resnet_tiny", ckpt, seed=0)
    common = ["--data-root", voc_root, "--wandb", "disabled", "--no-progress"]
    cases = {
        "unknown head": (["--head", "nope", *common], "head"),
        "fusion on a CNN": (["--evaluation", "E1", "--fusion", "affinity", *common], "fusion"),
        "unknown evaluation": (["--evaluation", "E9", *common], "evaluation"),
        "non-numeric epochs": (["--epochs", "abc", *common], "epochs"),
        "missing data root": (["--data-root", tmp_path / "nowhere", "--wandb", "disabled"], "nowhere"),
        "checkpoint of another arch": (["--source", f"checkpoint:{ckpt}", *common], "resnet_tiny"),
        "unknown flag": (["--bogus", "1"], "bogus"),
    }
    procs = {}
    for name, (args, _) in cases.items():  # started together: the imports dominate
        out = tmp_path / name.replace(" ", "_")
        procs[name] = (_cli([*args, "--output", out]), out)
    for name, (p, out) in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert p.returncode == 2, f"{name}: rc={p.returncode}\n{stderr[-2000:]}"
        assert "Traceback" not in stderr, f"{name}: {stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("twinseg: error: "), f"{name}: {stderr!r}"
        assert cases[name][1] in lines[0], f"{name}: {lines[0]}"
        assert not (out / "metrics.json").exists() and not (out / "config.json").exists(), name


def test_cli_evaluation_preset_swaps_to_tiny_backbone(tmp_path, voc_root):
    out = tmp_path / "e1"
    p = _cli(["--evaluation", "E1", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--limit-train",
              "8", "--limit-val", "4", "--data-root", voc_root, "--size", "tiny", "--wandb", "disabled",
              "--no-progress", "--output", out])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["evaluation"], m["backbone"], m["head"], m["fusion"]) == ("E1", "resnet_tiny", "deeplabv3", "none")
    assert "mIoU" in stdout


def test_cli_resolves_presets_and_explicit_flags_win(voc_root):
    sys.path.insert(0, str(REPO))
    from experiments.segment import build_parser, resolve_config

    def cfg(*a):
        return resolve_config(build_parser().parse_args(list(a)))

    c = cfg()
    assert (c.evaluation, c.backbone, c.head, c.fusion) == (None, "vit_nano_patch8", "setr_pup", "none")
    c = cfg("--evaluation", "E4")
    assert (c.backbone, c.head, c.fusion) == ("vit_nano_patch8", "setr_pup", "affinity")
    c = cfg("--evaluation", "E1", "--data-root", str(voc_root))  # real data root: preset kept
    assert c.backbone == "resnet50" and c.head == "deeplabv3"
    c = cfg("--evaluation", "E3", "--backbone", "vit_tiny_patch16", "--head", "setr_naive", "--size", "tiny")
    assert (c.backbone, c.head, c.fusion) == ("vit_tiny_patch16", "setr_naive", "features")
    c = cfg("--evaluation", "E5", "--source", "checkpoint:/x/backbone.pt")
    assert (c.backbone, c.fusion, c.source) == ("vit_nano_patch8", "affinity", "checkpoint:/x/backbone.pt")
    with pytest.raises(ConfigError, match="checkpoint:PATH"):
        cfg("--evaluation", "E5")  # tiny ViT has no official DINO weights


def test_iteration_based_mmseg_pipeline_run(tmp_path, voc_root):
    """max_iters trains by optimizer steps across epoch boundaries and still validates (and scores) at
    the last step; the mmseg training pipeline and the poly schedule run end to end."""
    from lightning.pytorch import Callback

    from core.runs.segment import run_segment

    class Steps(Callback):
        def __init__(self):
            self.val_at = []

        def on_validation_epoch_end(self, trainer, pl_module):
            self.val_at.append(trainer.global_step)

    rec = Steps()
    cfg = _cfg(voc_root, max_iters=3, schedule="poly", train_pipeline="mmseg", crop_size=32,
               data={"limit_train": 16})  # 2 batches per epoch: step 3 is mid-epoch 2
    m = run_segment(cfg, tmp_path / "it", progress=False, callbacks=[rec])
    assert rec.val_at == [3]  # one validation, at the last step (3 is not a multiple of 2000)
    assert 0.0 <= m["mIoU"] <= 100.0 and m["val_pixels"] > 0
    assert not (tmp_path / "it" / "checkpoints" / "last.ckpt").exists()  # deleted on success (keep_checkpoints)
