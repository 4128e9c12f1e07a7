"""Stage 1: one self-supervised pretraining run into a run folder.

`run_pretrain(cfg, out_dir)` is what `experiments/pretrain.py` and the grid trials call. The folder
rules (finished, resume, rank 0 writes, metrics.json last) are core/runs/skeleton.py's; this module
says what pretraining builds and measures. The method (Barlow Twins, DINO, ...) comes from its
registry entry (core/methods/registry.py): its views, its LightningModule, its result keys.
The run folder also holds backbone.pt (the input of `checkpoint:PATH`) and figures/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from core.config import PretrainConfig
from core.runs.common import ExternalDDP
from core.runs.skeleton import StageRun, execute

BACKBONE = "backbone.pt"


def build_method(cfg: PretrainConfig, loaders=None):
    """The LightningModule for `cfg` (batch augmentation on the device wired from the loaders)."""
    from core.methods.registry import get_method

    n = len(loaders.train) if loaders is not None else 1
    aug = loaders.batch_augment if loaders is not None else None
    return get_method(cfg.method).module(cfg, num_train_batches=n, gpu_augment=aug)


def _first_images(loader, n: int = 4) -> Optional[torch.Tensor]:
    if loader is None:
        return None
    for x, _ in loader:
        return x[:n].float()
    return None


def _final_loss(trainer) -> Optional[float]:
    m = trainer.callback_metrics
    for k in ("train/loss_epoch", "train/loss"):
        if k in m:
            return float(m[k])
    return None


def dense_evaluations(backbone, loaders, cfg, device) -> dict:
    """What the dense features and attention maps of ``backbone`` segment, on the k-NN images WITH their
    masks (`core.data.module.knn_mask_loader`: same datasets, original masks): ``{"attn": DINO's attention-mask
    Jaccard dict (core/metrics/attention_jaccard.py) or None (no attention maps: CNNs), "probe": frozen dense
    linear-probe val mIoU (core/metrics/dense_probe.py) or None (probe off)}``; both None without masks
    (imagefolder sources)."""
    from core.data.module import knn_mask_loader
    from core.metrics.attention_jaccard import attention_jaccard
    from core.metrics.dense_probe import dense_probe

    train, val = knn_mask_loader(loaders.knn_train), knn_mask_loader(loaders.knn_val)
    if train is None or val is None:
        return {"attn": None, "probe": None}
    background = 0 if cfg.data.dataset == "voc" else None  # COCO-Stuff: every label is an object
    attn = attention_jaccard(backbone, val, device, background=background)
    probe = None
    if cfg.dense_probe_steps > 0:
        probe = dense_probe(backbone, train, val, device, num_classes=loaders.knn_num_classes,
                            steps=cfg.dense_probe_steps)
    return {"attn": attn, "probe": probe}


class PretrainRun(StageRun):
    stage = "pretrain"
    artifact = BACKBONE
    summary_keys = ("knn_acc", "linear_probe_acc")

    def build(self) -> None:
        from core.data.module import build_ssl_loaders, validate_data
        from core.methods.registry import get_method

        cfg = self.cfg
        self.spec = get_method(cfg.method)
        validate_data(cfg.data, "pretrain")  # DataError (one line) before writing anything
        # Colour/blur/solarize on whole batches pays off on a GPU; on the CPU the per-image pipeline in
        # the loader is faster (measured: ~1.6 CPU-s per 2x32 views at 64 px for the batch version).
        self.gpu_aug = bool(cfg.gpu_augment and self.accelerator == "gpu")
        self.loaders = build_ssl_loaders(cfg.data, self.spec.views(cfg, self.gpu_aug), cfg.batch_size, seed=cfg.seed)
        self.method = build_method(cfg, self.loaders)
        self.weights_report: dict = {"source": "random"}
        if cfg.source != "random":
            from core.weights import load_source

            self.weights_report = load_source(self.method.backbone, cfg.source)
        self.method.on_weights_loaded()
        self.has_knn = self.loaders.knn_train is not None and self.loaders.knn_val is not None

    def evaluate(self, linear_probe: bool) -> dict:
        """k-NN (and linear probe) on the pooled features, how local the dense features are (what a
        segmentation head builds on), and what the attention maps and a frozen linear probe on the dense
        features segment (`dense_evaluations`), on the k-NN images, with the backbone the method exports."""
        from core.diagnostics.dense_features import dense_feature_stats
        from core.methods.knn_monitor import knn_eval

        if not self.has_knn:
            return {"knn_acc": None, "linear_probe_acc": None, "dense": {}, "attn": None, "probe": None}
        bb = self.method.export_backbone().to(self.device)
        out = knn_eval(bb, self.loaders.knn_train, self.loaders.knn_val, self.device, k=self.cfg.knn_k, T=0.07,
                       linear_probe=linear_probe)
        out["dense"] = dense_feature_stats(bb, self.loaders.knn_val, device=self.device)
        out.update(dense_evaluations(bb, self.loaders, self.cfg, self.device))
        return out

    def before_fit(self) -> None:
        # only rank 0 reports it (under DDP the other ranks skip the pass and wait at the first collective)
        self.init = self.evaluate(False) if self.is_writer else {"knn_acc": None, "dense": {}}
        self.method.cpu()

    def module(self):
        return self.method

    def fit_kwargs(self, trainer) -> dict:
        if not self.has_knn:
            trainer.limit_val_batches = 0
            return {"train_dataloaders": self.loaders.train}
        return {"train_dataloaders": self.loaders.train,
                "val_dataloaders": [self.loaders.knn_train, self.loaders.knn_val]}

    def callbacks(self, out_dir: Path) -> list:
        """The method's own diagnostics, CLS attention maps (ViTs) and receptive fields of a few layers;
        every `diagnostics_every` epochs, or only at the end when 0."""
        from core.diagnostics.callbacks import AttentionMapCallback, ReceptiveFieldCallback

        cfg, method = self.cfg, self.method
        every = cfg.diagnostics_every or cfg.epochs
        cbs = list(method.diagnostic_callbacks(every))
        images = _first_images(self.loaders.knn_val)
        if images is None:
            return cbs
        bb, attr = method.export_backbone(), method.eval_backbone_attr
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

    def extra_metric_keys(self) -> Iterable[str]:
        return tuple(self.spec.module.result_keys)

    def after_fit(self, trainer, out_dir: Path) -> dict:
        from core.weights import export_backbone

        cfg, method, init = self.cfg, self.method, self.init
        final = self.evaluate(True)
        own = method.result_metrics(self.loaders.train, self.device)
        own.update(method.collapse_metrics(own))  # embedding_std/rank, collapsed, collapse_reason (+ warning)
        path = out_dir / BACKBONE
        export_backbone(method.export_backbone(), path,
                        extra={"method": cfg.method, "source": cfg.source, "epochs": cfg.epochs})
        report = self.weights_report
        return {
            "method": cfg.method,
            "method_label": self.spec.label,
            "backbone": cfg.backbone,
            "source": cfg.source,
            "seed": cfg.seed,
            **own,
            "knn_acc": final["knn_acc"],
            "knn_acc_init": init["knn_acc"],
            "linear_probe_acc": final.get("linear_probe_acc"),
            "dense_rank": final["dense"].get("effective_rank"),
            "dense_rank_init": init["dense"].get("effective_rank"),
            "dense_local_var": final["dense"].get("local_variance_fraction"),
            "dense_local_var_init": init["dense"].get("local_variance_fraction"),
            "attn_jaccard": (final.get("attn") or {}).get("best"),
            "attn_jaccard_init": (init.get("attn") or {}).get("best"),
            "attn_jaccard_heads": (final.get("attn") or {}).get("per_head"),
            "dense_probe_miou": final.get("probe"),
            "dense_probe_miou_init": init.get("probe"),
            "final_loss": _final_loss(trainer),
            "epochs": cfg.epochs,
            "knn_k": cfg.knn_k,
            "knn_backbone": method.eval_backbone_attr,
            "backbone_path": str(path),
            "num_ssl_images": self.loaders.num_images,
            "skipped_files": int(getattr(self.loaders.train.dataset, "skipped", 0) or 0),
            "ssl_source": self.loaders.source,
            "gpu_augment": self.gpu_aug,
            "weights_loaded": report.get("loaded", 0) if isinstance(report, dict) else None,
        }


def run_pretrain(cfg: PretrainConfig, out_dir, *, progress: bool = True, wandb_group: Optional[str] = None,
                 callbacks: Iterable = (), name: Optional[str] = None, ddp: Optional[ExternalDDP] = None, overwrite: bool = False) -> dict:
    """Pretrain `cfg.backbone` with `cfg.method`; returns the metrics dict (also metrics.json).
    `ddp`: this call is one rank of an externally launched DDP job (ranks other than 0 return {}).
    `overwrite`: replace a run of another config found in `out_dir` instead of refusing it."""
    return execute(PretrainRun(cfg, ddp), out_dir, progress=progress, wandb_group=wandb_group,
                   callbacks=callbacks, name=name, overwrite=overwrite)
