"""Stage 1: one self-supervised pretraining run (Barlow Twins or DINO) into a run folder.

`run_pretrain(cfg, out_dir)` is the single source of truth used by `experiments/pretrain.py` and the
grid trials. Run folder (ARCHITECTURE.md): config.json, history.csv, checkpoints/last.ckpt,
backbone.pt, figures/, and metrics.json written LAST and atomically (its presence = finished; a
rerun returns it without training). A run interrupted before the end resumes from last.ckpt.
Nothing that could pass for a result (backbone.pt, history.csv, metrics.json) is written on failure.

`ddp` (`core.runs.common.ExternalDDP`, None by default) runs this call as ONE rank of a DDP job
started elsewhere (the grid's Ray Train workers): every rank trains (`batch_size` per rank), only
global rank 0 writes config.json and, after `trainer.fit`, evaluates and writes the results; the other
ranks return `{}`. Nothing after `trainer.fit` is a collective call, so rank 0 alone can do it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from core.config import PretrainConfig
from core.errors import ConfigError
from core.runs.common import (
    ExternalDDP,
    atomic_write_json,
    finish_wandb,
    is_finished,
    last_checkpoint,
    make_loggers,
    make_trainer,
    resolve_accelerator,
    write_history,
)

METRICS = "metrics.json"
CONFIG = "config.json"
BACKBONE = "backbone.pt"


def method_class(name: str):
    if name == "barlow_twins":
        from core.methods.barlow_twins import BarlowTwinsMethod

        return BarlowTwinsMethod
    if name == "dino":
        from core.methods.dino import DINOMethod

        return DINOMethod
    raise ConfigError(f"method={name!r} is not allowed; choose one of: barlow_twins, dino")


def build_method(cfg: PretrainConfig, loaders=None):
    """The LightningModule for `cfg` (batch augmentation on the device wired from the loaders)."""
    n = len(loaders.train) if loaders is not None else 1
    aug = loaders.batch_augment if loaders is not None else None
    return method_class(cfg.method)(cfg, num_train_batches=n, gpu_augment=aug)


def _check_same_config(out_dir: Path, cfg: PretrainConfig) -> None:
    """Resuming into a folder that holds another configuration would mix two runs: refuse."""
    p = out_dir / CONFIG
    if p.is_file() and last_checkpoint(out_dir) is not None:
        try:
            old = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return
        new = cfg.to_dict()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                f"{out_dir} holds an unfinished run with a different config (fields {', '.join(diff)}); "
                f"use another output folder or delete {out_dir}"
            )


def _first_images(loader, n: int = 4) -> Optional[torch.Tensor]:
    if loader is None:
        return None
    for x, _ in loader:
        return x[:n].float()
    return None


@torch.no_grad()
def _cc_on_batch(method, loader, device) -> dict:
    """Barlow Twins cross-correlation statistics of the trained model on one fresh training batch
    (two augmented views, model in eval mode). On the calling process' batch alone: under DDP only
    rank 0 runs this, after fit, where a collective call would hang."""
    from core.losses.barlow_twins import cc_statistics, cross_correlation
    from core.methods.barlow_twins import unpack_views

    if cfg_method(method) != "barlow_twins":
        return {"cc_diag_mean": None, "cc_offdiag_rms": None}
    was = method.training
    method.eval()
    try:
        for batch in loader:
            views = unpack_views(batch)
            x1, x2 = (method.prepare_view(v.to(device), i) for i, v in enumerate(views[:2]))
            z1 = method.projector(method.backbone(x1))
            z2 = method.projector(method.backbone(x2))
            return cc_statistics(cross_correlation(z1, z2, gather=False))
    finally:
        method.train(was)
    return {"cc_diag_mean": None, "cc_offdiag_rms": None}


def cfg_method(method) -> str:
    return getattr(method, "method_name", "")


def _diagnostic_callbacks(cfg: PretrainConfig, method, images) -> list:
    """CrossCorrelation (Barlow Twins), AttentionMap (ViTs with a CLS token), ReceptiveField (a few
    layers); every `cfg.diagnostics_every` epochs, or only at the end when 0."""
    try:
        from core.diagnostics.callbacks import (
            AttentionMapCallback,
            CrossCorrelationCallback,
            ReceptiveFieldCallback,
        )
    except ImportError:
        return []
    every = cfg.diagnostics_every or cfg.epochs
    bb = method.export_backbone()
    attr = "teacher_backbone" if cfg.method == "dino" else "backbone"
    cbs: list = []
    if cfg.method == "barlow_twins":
        cbs.append(CrossCorrelationCallback(every_n_epochs=every))
    if images is not None:
        if getattr(bb, "is_transformer", False) and getattr(bb, "has_cls_token", False):
            cbs.append(AttentionMapCallback(images=images, every_n_epochs=every, backbone_attr=attr))
        try:
            names = list(bb.layers())
        except (NotImplementedError, AttributeError):
            names = []
        if names:
            pick = sorted({0, len(names) // 2, len(names) - 1})
            cbs.append(ReceptiveFieldCallback(images=images[:2], layers=[names[i] for i in pick],
                                              every_n_epochs=every, backbone_attr=attr))
    return cbs


def _final_loss(trainer) -> Optional[float]:
    m = trainer.callback_metrics
    for k in ("train/loss_epoch", "train/loss"):
        if k in m:
            return float(m[k])
    return None


def run_pretrain(cfg: PretrainConfig, out_dir, *, progress: bool = True, wandb_group: Optional[str] = None,
                 callbacks: Iterable = (), name: Optional[str] = None, ddp: Optional[ExternalDDP] = None) -> dict:
    """Pretrain `cfg.backbone` with `cfg.method`; returns the metrics dict (also metrics.json).
    `ddp`: this call is one rank of an externally launched DDP job (ranks other than 0 return {})."""
    import lightning.pytorch as pl

    from core.accounting import AccountingCallback
    from core.data.module import build_ssl_loaders
    from core.diagnostics.dense_features import dense_feature_stats
    from core.methods.knn_monitor import knn_eval

    out_dir = Path(out_dir)
    if is_finished(out_dir):
        return json.loads((out_dir / METRICS).read_text())
    _check_same_config(out_dir, cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if ddp is None:
        accelerator, n_dev = resolve_accelerator(cfg.device, cfg.devices)  # ConfigError before writing anything
    else:  # one device per rank, chosen by the launcher
        accelerator, n_dev = ddp.accelerator, 1
    from core.data.module import validate_data

    validate_data(cfg.data, "pretrain")  # DataError (one line) before writing anything

    # Colour/blur/solarize on whole batches pays off on a GPU; on the CPU the per-image pipeline in
    # the loader is faster (measured: ~1.6 CPU-s per 2x32 views at 64 px for the batch version).
    gpu_aug = bool(cfg.gpu_augment and accelerator == "gpu")
    loaders = build_ssl_loaders(cfg.data, cfg.method, cfg.batch_size, gpu_augment=gpu_aug,
                                dino_local_crops=cfg.dino_local_crops, seed=cfg.seed)
    method = build_method(cfg, loaders)
    report = {"source": "random"}
    if cfg.source != "random":
        from core.weights import load_source

        report = load_source(method.backbone, cfg.source)
    method.on_weights_loaded()
    # Only now, with data, model and weights known good, does the run folder appear.
    out_dir.mkdir(parents=True, exist_ok=True)
    if ddp is None or ddp.is_rank_zero:
        atomic_write_json(out_dir / CONFIG, cfg.to_dict())

    device = torch.device("cuda" if accelerator == "gpu" else "cpu") if ddp is None else torch.device(ddp.device)
    has_knn = loaders.knn_train is not None and loaders.knn_val is not None
    k, T = cfg.knn_k, 0.07

    def evaluate(linear_probe: bool) -> dict:
        if not has_knn:
            return {"knn_acc": None, "linear_probe_acc": None, "dense": {}}
        bb = method.export_backbone()
        bb.to(device)
        out = knn_eval(bb, loaders.knn_train, loaders.knn_val, device, k=k, T=T, linear_probe=linear_probe)
        # how local the dense features are (what a segmentation head builds on), on the k-NN val images
        out["dense"] = dense_feature_stats(bb, loaders.knn_val, device=device)
        return out

    # only rank 0 reports it (under DDP the other ranks skip the pass and wait at the first collective)
    init = evaluate(False) if ddp is None or ddp.is_rank_zero else {"knn_acc": None, "dense": {}}
    knn_init = init["knn_acc"]
    method.cpu()

    run_name = name or out_dir.name
    loggers = make_loggers(out_dir, cfg.wandb, wandb_group, run_name, cfg.to_dict())
    acct = AccountingCallback()
    images = _first_images(loaders.knn_val)
    cbs = [acct, *_diagnostic_callbacks(cfg, method, images), *callbacks]
    trainer = make_trainer(out_dir=out_dir, max_epochs=cfg.epochs, device=cfg.device, devices=cfg.devices,
                           precision=cfg.precision, loggers=loggers, callbacks=cbs, progress=progress, ddp=ddp)
    try:
        ckpt = last_checkpoint(out_dir)
        fit_kw: dict[str, Any] = {"train_dataloaders": loaders.train}
        if has_knn:
            fit_kw["val_dataloaders"] = [loaders.knn_train, loaders.knn_val]
        else:
            trainer.limit_val_batches = 0
        trainer.fit(method, ckpt_path=str(ckpt) if ckpt else None, **fit_kw)
        if trainer.interrupted:
            raise KeyboardInterrupt
        if not trainer.is_global_zero:
            return {}

        final = evaluate(True)
        cc = _cc_on_batch(method, loaders.train, device)
        from core.weights import export_backbone

        backbone_path = out_dir / BACKBONE
        export_backbone(method.export_backbone(), backbone_path,
                        extra={"method": cfg.method, "source": cfg.source, "epochs": cfg.epochs})
        write_history(out_dir)
        metrics = {
            "stage": "pretrain",
            "method": cfg.method,
            "backbone": cfg.backbone,
            "source": cfg.source,
            "lambd": cfg.lambd,
            "seed": cfg.seed,
            "knn_acc": final["knn_acc"],
            "knn_acc_init": knn_init,
            "linear_probe_acc": final.get("linear_probe_acc"),
            "dense_rank": final["dense"].get("effective_rank"),
            "dense_rank_init": init["dense"].get("effective_rank"),
            "dense_local_var": final["dense"].get("local_variance_fraction"),
            "dense_local_var_init": init["dense"].get("local_variance_fraction"),
            "final_loss": _final_loss(trainer),
            "cc_diag_mean": cc["cc_diag_mean"],
            "cc_offdiag_rms": cc["cc_offdiag_rms"],
            "epochs": cfg.epochs,
            "knn_k": k,
            "knn_backbone": "teacher" if cfg.method == "dino" else "backbone",
            **acct.summary(),
            "backbone_path": str(backbone_path),
            "num_ssl_images": loaders.num_images,
            "skipped_files": int(getattr(loaders.train.dataset, "skipped", 0) or 0),
            "ssl_source": loaders.source,
            "gpu_augment": gpu_aug,
            "weights_loaded": report.get("loaded", 0) if isinstance(report, dict) else None,
        }
        atomic_write_json(out_dir / METRICS, metrics)
        return metrics
    finally:
        finish_wandb(loggers)
