"""Stage 2 run: train and evaluate one segmentation model into a run folder.

`run_segment(cfg, out_dir, *, progress=True, wandb_group=None, callbacks=(), name=None) -> dict` is
what `experiments/segment.py` and the grid's stage-2 trials call. The folder rules (finished, resume,
nothing written before the inputs check out, rank 0 writes, metrics.json last) are
core/runs/skeleton.py's; this module says what segmentation builds and measures: the final
validation over the whole val set, and model.pt.

The backbone's weights come from ``cfg.source`` through `core.weights.load_source`: ``random``,
``imagenet``, ``dino``, ``coco-deeplab``, ... or ``checkpoint:PATH`` to a stage-1 ``backbone.pt``
(``{"arch", "state_dict"}``) - that is how a pretrained backbone is consumed.

``ddp`` (``core.runs.common.ExternalDDP``, None by default) runs this call as ONE rank of a DDP job
started elsewhere (the grid's Ray Train workers): every rank trains and validates (``batch_size`` per
rank; the confusion matrix is summed over ranks), only global rank 0 writes config.json, history.csv,
model.pt and metrics.json; the other ranks return ``{}``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

from core.config import SegmentConfig
from core.errors import ConfigError
from core.io import atomic_torch_save
from core.runs.common import ExternalDDP
from core.runs.skeleton import StageRun, execute
from core.stages import SEGMENT
from core.weights import load_source

STAGE = SEGMENT.name
MODEL = "model.pt"
VAL_INTERVAL = 2000  # steps between validations of an iteration-based run (mmseg schedule_20k/40k)


def resolve_segment_config(cfg: Union[SegmentConfig, dict]) -> SegmentConfig:
    """A SegmentConfig as is, or a raw dict: its evaluation preset merged (explicit keys win)."""
    if isinstance(cfg, SegmentConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f"segment config must be a SegmentConfig or a mapping, got {type(cfg).__name__}")
    d = dict(cfg)
    if d.get("evaluation"):
        from core.evaluations import apply_evaluation

        d = _apply(apply_evaluation, d)
    return SegmentConfig.from_dict(d)


def _apply(apply_evaluation, d: dict) -> dict:
    return dict(apply_evaluation(d, d["evaluation"]))


#: DeepLabV3 runs on a dilated ResNet-50 (output stride 8, as torchvision's / the paper's DeepLabV3);
#: BasicBlock ResNets (resnet18, resnet_tiny) cannot dilate and stay at stride 32.
DEEPLAB_OUTPUT_STRIDE = 8
DILATABLE = ("resnet50",)


def backbone_options(cfg: SegmentConfig) -> dict:
    """Extra create_backbone options implied by the head (recorded in metrics.json)."""
    if cfg.head == "deeplabv3" and cfg.backbone in DILATABLE:
        return {"output_stride": DEEPLAB_OUTPUT_STRIDE}
    return {}


def check_fit(cfg: SegmentConfig, backbone) -> None:
    """The one check that the head, the fusion and the image / sliding-window sizes fit `backbone`:
    one ConfigError line otherwise. Used by `preflight` and by the grid's pre-start validation."""
    from core.models.heads import head_refusal
    from core.models.heads.fusion import fusion_refusal

    size = cfg.data.image_size
    backbone.check_input_size(size, size)
    err = fusion_refusal(cfg.fusion, backbone, cfg.fusion_blocks) or head_refusal(cfg.head, backbone)
    if err is None and cfg.aux_heads:
        from core.models.heads.setr import aux_heads_refusal

        err = aux_heads_refusal(cfg.head, backbone)
    if err is not None:
        raise err
    if cfg.inference == "slide":
        from core.models.segmenter import slide_window

        m = getattr(backbone, "size_multiple", None)
        if m and cfg.slide_crop is not None and cfg.slide_crop % m:
            raise ConfigError(f"slide_crop={cfg.slide_crop} is not a multiple of {m} required by {backbone.name}; "
                              f"use a multiple of {m}")
        crop, stride = slide_window(cfg, m)
        if stride > crop:
            raise ConfigError(f"slide_stride={stride} must be <= the sliding-window crop {crop} ({backbone.name}'s "
                              f"patch multiple at or below the evaluation short side); lower slide_stride")


def preflight(cfg: SegmentConfig, devices: Optional[int] = None):
    """Build the (randomly initialised) backbone and `check_fit` it: one ConfigError line otherwise.
    Returns the backbone. `devices`: the devices this process drives (default `cfg.devices`; 1 for a
    rank of an external DDP job)."""
    from core.models.registry import create_backbone
    from core.runs.common import resolve_accelerator

    resolve_accelerator(cfg.device, cfg.devices if devices is None else devices)  # device=cuda without a GPU: ConfigError
    backbone = create_backbone(cfg.backbone, image_size=cfg.data.image_size, **backbone_options(cfg))
    check_fit(cfg, backbone)
    return backbone


def build_loaders(cfg: SegmentConfig):
    """The train and val loaders of `cfg` (`core.data.module.build_seg_loaders`)."""
    from core.data.module import build_seg_loaders, seg_train_kwargs

    return build_seg_loaders(cfg.data, cfg.batch_size, seed=cfg.seed, eval_scale=cfg.eval_short_side(),
                             eval_max_long=cfg.eval_long_cap(), **seg_train_kwargs(cfg))


def build_method(cfg: SegmentConfig, backbone, loaders):
    """The LightningModule of `cfg` on `backbone`, for the loaders' dataset (classes, ignore index)."""
    from core.methods.segmentation import SegmentationMethod

    return SegmentationMethod(cfg, int(loaders.num_classes), list(loaders.class_names),
                              ignore_index=int(getattr(loaders, "ignore_index", 255)), backbone=backbone)


def default_run_name(cfg: SegmentConfig) -> str:
    tag = cfg.evaluation or cfg.head
    return f"segment-{tag}-{cfg.backbone}-{cfg.source.split(':')[0]}-{cfg.mode}-s{cfg.seed}"


class SegmentRun(StageRun):
    stage = STAGE
    artifact = MODEL
    summary_keys = ("mIoU", "aAcc", "mAcc")

    def build(self) -> None:
        cfg = self.cfg
        self.backbone = preflight(cfg, None if self.ddp is None else 1)  # backbone / head / fusion fit, sizes
        self.load_report = load_source(self.backbone, cfg.source)  # WeightsError; on resume too
        self.loaders = build_loaders(cfg)  # DataError
        self.num_classes, self.class_names = int(self.loaders.num_classes), list(self.loaders.class_names)
        self.model = build_method(cfg, self.backbone, self.loaders)
        if cfg.mode == "frozen":  # the frozen backbone is in eval mode on purpose
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

    def module(self):
        return self.model

    def trainer_limits(self) -> dict:
        """`max_iters` set: iteration-based training (mmseg schedules), validated every 2000 steps as mmseg's
        20k/40k VOC schedules (or once, at the end, when max_iters is not a multiple of 2000)."""
        mi = self.cfg.max_iters
        if mi is None:
            return super().trainer_limits()
        return {"max_epochs": -1, "max_steps": mi, "val_every_steps": VAL_INTERVAL if mi % VAL_INTERVAL == 0 else mi}

    def fit_kwargs(self, trainer) -> dict:
        return {"train_dataloaders": self.loaders.train, "val_dataloaders": self.loaders.val}

    def callbacks(self, out_dir: Path) -> list:
        return _diagnostic_callbacks(self.cfg, out_dir, self.backbone, self.class_names,
                                     getattr(self.loaders, "palette", None),
                                     getattr(self.loaders, "val_dataset", None))

    def default_name(self, out_dir: Path) -> str:
        return default_run_name(self.cfg)

    def on_every_rank_after_fit(self, trainer) -> None:
        if self.model.final_metrics() is None:  # resumed from a completed fit: evaluate now
            trainer.validate(self.model, dataloaders=self.loaders.val, verbose=False)
        if self.model.final_metrics() is None:
            raise RuntimeError("segmentation run ended without a validation pass")

    def after_fit(self, trainer, out_dir: Path) -> dict:
        from core.metrics.registry import EVAL, evaluate

        cfg, final = self.cfg, self.model.final_metrics()
        model_path = out_dir / MODEL
        atomic_torch_save({"arch": cfg.backbone, "head": cfg.head, "fusion": cfg.fusion,
                           "num_classes": self.num_classes, "class_names": self.class_names,
                           # model.pt holds what inference uses: the auxiliary heads are training-only
                           "state_dict": {k: v for k, v in self.model.model.state_dict().items()
                                          if not k.startswith("aux_heads.")}}, model_path)
        return {
            "evaluation": cfg.evaluation,
            "backbone": cfg.backbone,
            "head": cfg.head,
            "fusion": cfg.fusion,
            "source": cfg.source,
            "mode": cfg.mode,
            "loss": cfg.loss,
            "inference": cfg.inference,
            "seed": cfg.seed,
            "dataset": cfg.data.dataset,
            "image_size": cfg.data.image_size,
            "num_classes": self.num_classes,
            "output_stride": int(getattr(self.backbone, "stride", 0) or 0),
            **evaluate(STAGE, EVAL, final),  # mIoU, aAcc, mAcc, IoU, val_pixels, ... (core/metrics/registry.py)
            "eval_protocol": eval_protocol(cfg, self.backbone, self.loaders),
            "class_names": self.class_names,
            "epochs": cfg.epochs,
            "final_train_loss": _scalar(trainer.callback_metrics.get("train/loss_epoch")),
            "val_loss": _scalar(trainer.callback_metrics.get("val/loss")),
            "source_report": _short_report(self.load_report),
            "skipped_files": _skipped(self.loaders),  # data.corrupt_policy=skip: samples skipped
            "model_path": str(model_path),
        }


def run_segment(cfg: Union[SegmentConfig, dict], out_dir: Union[str, Path], *, progress: bool = True,
                wandb_group: Optional[str] = None, callbacks: Iterable = (), name: Optional[str] = None,
                ddp: Optional[ExternalDDP] = None, overwrite: bool = False) -> dict:
    """Train and evaluate `cfg` into `out_dir`; returns the metrics dict (also metrics.json).
    `overwrite`: replace a run of another config found in `out_dir` instead of refusing it."""
    return execute(SegmentRun(resolve_segment_config(cfg), ddp), out_dir, progress=progress,
                   wandb_group=wandb_group, callbacks=callbacks, name=name, overwrite=overwrite)


# --------------------------------------------------------------------------- helpers
def eval_protocol(cfg: SegmentConfig, backbone=None, loaders=None) -> dict:
    """How the val numbers were measured (metrics.json ``eval_protocol``): the split and its image count,
    the evaluation resize (short side, long-side cap, aspect ratio kept), the inference mode (and
    sliding window), and that scores are taken on the ORIGINAL masks (logits resized back, 255 ignored)."""
    from core.models.segmenter import slide_window

    ds = getattr(loaders, "val_dataset", None)
    out = {
        "split": "val2017" if cfg.data.dataset == "coco_stuff" else "val",
        "images": len(ds) if ds is not None else None,
        "resolution": "original",
        "eval_scale": cfg.eval_short_side(),
        "eval_max_long": cfg.eval_long_cap(),
        "inference": cfg.inference,
    }
    if cfg.inference == "slide":
        out["slide_crop"], out["slide_stride"] = slide_window(cfg, getattr(backbone, "size_multiple", None))
    return out


def _skipped(loaders) -> int:
    """Bad samples skipped (corrupt_policy=skip) by the train and val datasets, all workers."""
    return sum(int(getattr(ds, "skipped", 0) or 0)
               for ds in (getattr(loaders, "train_dataset", None), getattr(loaders, "val_dataset", None)))


def _scalar(v) -> Optional[float]:
    if v is None:
        return None
    try:
        return round(float(v), 6)
    except (TypeError, ValueError):
        return None


def _short_report(rep) -> dict:
    if not isinstance(rep, dict):
        return {}
    out = {}
    for k, v in rep.items():
        if isinstance(v, (list, tuple)):
            out[k] = len(v)
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


def _diagnostic_callbacks(cfg: SegmentConfig, out_dir: Path, backbone, class_names, palette=None,
                         val_dataset=None) -> list:
    """Prediction overlays (image | truth | prediction) on the first val images, and CLS attention
    maps when the backbone is a ViT; every `diagnostics_every` epochs (0: at the last epoch only).
    PNGs go to <out_dir>/figures/. Skipped when the diagnostics module is absent. The overlays show the
    images at the evaluation size with their masks resized (nearest) to it
    (`core.data.module.seg_display_batch`); the scores use the original masks."""
    try:
        from core.diagnostics.callbacks import AttentionMapCallback, PredictionCallback
    except ImportError:
        return []
    every = cfg.diagnostics_every if cfg.diagnostics_every > 0 else 10**9  # the last epoch is always due
    images = targets = None
    if val_dataset is not None and len(val_dataset):
        from core.data.module import seg_display_batch

        images, targets = seg_display_batch(val_dataset, 4, getattr(backbone, "size_multiple", None))
    out = [PredictionCallback(images, targets, every_n_epochs=every, class_names=class_names, palette=palette,
                              out_dir=out_dir)]
    if getattr(backbone, "has_cls_token", False):
        out.append(AttentionMapCallback(images, every_n_epochs=every, out_dir=out_dir))
    return out
