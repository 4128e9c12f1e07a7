"""Stage 2 run: train and evaluate one segmentation model into a run folder.

`run_segment(cfg, out_dir, *, progress=True, wandb_group=None, callbacks=(), name=None) -> dict` is
the single source of truth used by `experiments/segment.py` and the grid's stage-2 trials.

Order (so that a bad input writes nothing):
1. a finished folder (metrics.json present) returns its metrics without retraining;
2. data loaders, model and weights are built and checked (DataError / ConfigError / WeightsError,
   one line) before anything is written;
3. config.json, then training (resuming from checkpoints/last.ckpt), final validation over the
   whole val set, history.csv, model.pt, and LAST metrics.json (atomic).

The backbone's weights come from ``cfg.source`` through `core.weights.load_source`: ``random``,
``imagenet``, ``dino``, ``coco-deeplab``, ... or ``checkpoint:PATH`` to a stage-1 ``backbone.pt``
(``{"arch", "state_dict"}``) - that is how a pretrained backbone is consumed.

``ddp`` (``core.runs.common.ExternalDDP``, None by default) runs this call as ONE rank of a DDP job
started elsewhere (the grid's Ray Train workers): every rank trains and validates (``batch_size`` per
rank; the confusion matrix is summed over ranks), only global rank 0 writes config.json, history.csv,
model.pt and metrics.json; the other ranks return ``{}``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from core.config import SegmentConfig
from core.errors import ConfigError
from core.runs.common import (
    ExternalDDP,
    _jsonable,
    atomic_write_json,
    finish_wandb,
    last_checkpoint,
    make_loggers,
    make_trainer,
    write_history,
)
from core.weights import load_source

STAGE = "segment"


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


def preflight(cfg: SegmentConfig, devices: Optional[int] = None):
    """Build the (randomly initialised) backbone and check that the head, the fusion and the image /
    sliding-window sizes fit it: one ConfigError line otherwise. Returns the backbone. `devices`:
    the devices this process drives (default `cfg.devices`; 1 for a rank of an external DDP job)."""
    from core.models.heads import head_refusal
    from core.models.heads.fusion import check_fusion
    from core.models.registry import create_backbone

    from core.runs.common import resolve_accelerator

    resolve_accelerator(cfg.device, cfg.devices if devices is None else devices)  # device=cuda without a GPU: ConfigError
    backbone = create_backbone(cfg.backbone, image_size=cfg.data.image_size, **backbone_options(cfg))
    err = head_refusal(cfg.head, backbone)
    if err is not None:
        raise err
    check_fusion(cfg.fusion, backbone, cfg.fusion_blocks)
    size = cfg.data.image_size
    backbone.check_input_size(size, size)
    if cfg.inference == "slide":
        m = getattr(backbone, "size_multiple", None)
        if m and cfg.slide_crop % m:
            raise ConfigError(f"slide_crop={cfg.slide_crop} is not a multiple of {m} required by {backbone.name}; "
                              f"use a multiple of {m}")
    return backbone


def default_run_name(cfg: SegmentConfig) -> str:
    tag = cfg.evaluation or cfg.head
    return f"segment-{tag}-{cfg.backbone}-{cfg.source.split(':')[0]}-{cfg.mode}-s{cfg.seed}"


def run_segment(cfg: Union[SegmentConfig, dict], out_dir: Union[str, Path], *, progress: bool = True,
                wandb_group: Optional[str] = None, callbacks: Iterable = (), name: Optional[str] = None,
                ddp: Optional[ExternalDDP] = None) -> dict:
    cfg = resolve_segment_config(cfg)
    writer = ddp is None or ddp.is_rank_zero  # under DDP only global rank 0 writes files
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file():
        with open(metrics_path) as f:
            return json.load(f)

    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    # ---- everything that can be wrong with the inputs fails here, before any file is written
    backbone = preflight(cfg, None if ddp is None else 1)  # backbone / head / fusion fit, sizes (ConfigError)
    resume = last_checkpoint(out_dir)
    load_report = load_source(backbone, cfg.source)  # WeightsError; also on resume: the source must resolve

    from core.data.module import build_seg_loaders

    loaders = build_seg_loaders(cfg.data, cfg.batch_size, seed=cfg.seed)  # DataError
    train_loader, val_loader = loaders.train, loaders.val
    num_classes, class_names = int(loaders.num_classes), list(loaders.class_names)
    ignore_index = int(getattr(loaders, "ignore_index", 255))
    palette = getattr(loaders, "palette", None)

    from core.methods.segmentation import SegmentationMethod

    module = SegmentationMethod(cfg, num_classes, class_names, ignore_index=ignore_index, backbone=backbone)

    # ---- the run
    if resume is not None:
        warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
    if cfg.mode == "frozen":  # the frozen backbone is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    out_dir.mkdir(parents=True, exist_ok=True)
    if writer:
        atomic_write_json(out_dir / "config.json", cfg.to_dict())
    run_name = name or default_run_name(cfg)
    model_path = out_dir / "model.pt"
    loggers: list = []
    try:
        from core.accounting import AccountingCallback

        accounting = AccountingCallback()
        cbs = [accounting, *_diagnostic_callbacks(cfg, out_dir, backbone, class_names, palette), *callbacks]
        loggers = make_loggers(out_dir, cfg.wandb, wandb_group, run_name, cfg.to_dict())
        trainer = make_trainer(out_dir=out_dir, max_epochs=cfg.epochs, device=cfg.device, devices=cfg.devices,
                               precision=cfg.precision, loggers=loggers, callbacks=cbs, progress=progress, ddp=ddp)
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                    ckpt_path=str(resume) if resume else None)
        if trainer.interrupted:
            raise KeyboardInterrupt
        final = module.final_metrics()
        if final is None:  # resumed from a completed fit: evaluate now
            trainer.validate(module, dataloaders=val_loader, verbose=False)
            final = module.final_metrics()
        if final is None:
            raise RuntimeError("segmentation run ended without a validation pass")
        if not trainer.is_global_zero:
            return {}
        write_history(out_dir)
        tmp = model_path.with_name(".model.pt.tmp")
        torch.save({"arch": cfg.backbone, "head": cfg.head, "fusion": cfg.fusion, "num_classes": num_classes,
                    "class_names": class_names, "state_dict": module.model.state_dict()}, tmp)
        tmp.replace(model_path)
        metrics: dict[str, Any] = {
            "stage": STAGE,
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
            "num_classes": num_classes,
            "output_stride": int(getattr(backbone, "stride", 0) or 0),
            "mIoU": final["mIoU"],
            "aAcc": final["aAcc"],
            "mAcc": final["mAcc"],
            "IoU": final["IoU"],
            "class_names": class_names,
            "epochs": cfg.epochs,
            "final_train_loss": _scalar(trainer.callback_metrics.get("train/loss_epoch")),
            "val_loss": _scalar(trainer.callback_metrics.get("val/loss")),
            "source_report": _short_report(load_report),
            # data.corrupt_policy=skip: how many unreadable / out-of-range samples were skipped
            "skipped_files": _skipped(loaders),
            **accounting.summary(),
            "model_path": str(model_path),
        }
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                try:
                    lg.experiment.summary.update({f"final/{k}": metrics[k] for k in ("mIoU", "aAcc", "mAcc")})
                except Exception as e:  # noqa: BLE001 - logging never fails a finished run, but says so
                    warnings.warn(f"wandb: writing the final summary failed ({type(e).__name__}: {e}); "
                                  "metrics.json is complete", RuntimeWarning, stacklevel=2)
        atomic_write_json(metrics_path, metrics)
        return _jsonable(metrics)  # exactly what metrics.json holds (NaN -> None)
    except BaseException:
        # nothing that could pass for a result survives a failed run (checkpoints stay for resume)
        if writer:
            model_path.unlink(missing_ok=True)
            model_path.with_name(".model.pt.tmp").unlink(missing_ok=True)
        raise
    finally:
        finish_wandb(loggers)


# --------------------------------------------------------------------------- helpers
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


def _diagnostic_callbacks(cfg: SegmentConfig, out_dir: Path, backbone, class_names, palette=None) -> list:
    """Prediction overlays (image | truth | prediction) on the first val images, and CLS attention
    maps when the backbone is a ViT; every `diagnostics_every` epochs (0: at the last epoch only).
    PNGs go to <out_dir>/figures/. Skipped when the diagnostics module is absent."""
    try:
        from core.diagnostics.callbacks import AttentionMapCallback, PredictionCallback
    except ImportError:
        return []
    every = cfg.diagnostics_every if cfg.diagnostics_every > 0 else 10**9  # the last epoch is always due
    out = [PredictionCallback(every_n_epochs=every, class_names=class_names, palette=palette, out_dir=out_dir)]
    if getattr(backbone, "has_cls_token", False):
        out.append(AttentionMapCallback(every_n_epochs=every, out_dir=out_dir))
    return out
