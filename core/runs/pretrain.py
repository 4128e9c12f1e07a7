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
from core.stages import PRETRAIN

STAGE = PRETRAIN.name
BACKBONE = "backbone.pt"


def build_method(cfg: PretrainConfig, loaders=None):
    """The LightningModule for `cfg` (batch augmentation on the device wired from the loaders)."""
    from core.methods.registry import get_method

    n = len(loaders.train) if loaders is not None else 1
    aug = loaders.batch_augment if loaders is not None else None
    return get_method(cfg.method).module(cfg, num_train_batches=n, gpu_augment=aug)


def build_loaders(cfg: PretrainConfig, gpu_augment: bool):
    """The SSL loaders of `cfg`: its method's views (the colour part left to the device when `gpu_augment`)."""
    from core.data.module import build_ssl_loaders
    from core.methods.registry import get_method

    return build_ssl_loaders(cfg.data, get_method(cfg.method).views(cfg, gpu_augment), cfg.batch_size, seed=cfg.seed)


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
    masks: ``{"attn": DINO's attention-mask Jaccard dict (core/metrics/attention_jaccard.py) or None (no
    attention maps: CNNs), "probe": frozen dense linear-probe val mIoU (core/metrics/dense_probe.py) or None
    (probe off)}``; both None without masks (imagefolder sources)."""
    from core.metrics.attention_jaccard import attention_scores
    from core.metrics.dense_probe import probe_score
    from core.metrics.registry import AFTER, EvalContext

    ctx = EvalContext(backbone, loaders, cfg, device, AFTER)
    return {"attn": attention_scores(ctx), "probe": probe_score(ctx)}


class PretrainRun(StageRun):
    stage = STAGE
    artifact = BACKBONE
    summary_keys = ("knn_acc", "linear_probe_acc")

    def build(self) -> None:
        from core.data.module import validate_data
        from core.methods.registry import get_method

        cfg = self.cfg
        self.spec = get_method(cfg.method)
        validate_data(cfg.data, STAGE)  # DataError (one line) before writing anything
        # Colour/blur/solarize on whole batches pays off on a GPU; on the CPU the per-image pipeline in
        # the loader is faster (measured: ~1.6 CPU-s per 2x32 views at 64 px for the batch version).
        self.gpu_aug = bool(cfg.gpu_augment and self.accelerator == "gpu")
        self.loaders = build_loaders(cfg, self.gpu_aug)
        self.method = build_method(cfg, self.loaders)
        self.weights_report: dict = {"source": "random"}
        if cfg.source != "random":
            from core.weights import load_source

            self.weights_report = load_source(self.method.backbone, cfg.source)
        self.method.on_weights_loaded()
        self.has_knn = self.loaders.knn_train is not None and self.loaders.knn_val is not None

    def evaluate(self, when: str) -> dict:
        """The registered pretraining evaluations of moment `when` (BEFORE / AFTER: k-NN and linear probe on
        the pooled features, the dense features' rank and locality, attention Jaccard, dense probe, ...;
        core/metrics/registry.py, in their declared order) of the backbone the method exports, on the k-NN
        images; every value None without k-NN images."""
        from core.metrics.registry import EvalContext, evaluate

        if not self.has_knn:
            return evaluate(STAGE, when, skip=True)
        bb = self.method.export_backbone().to(self.device)
        return evaluate(STAGE, when, EvalContext(bb, self.loaders, self.cfg, self.device, when))

    def before_fit(self) -> None:
        from core.metrics.registry import BEFORE, evaluate

        # only rank 0 reports it (under DDP the other ranks skip the pass and wait at the first collective)
        self.init = self.evaluate(BEFORE) if self.is_writer else evaluate(STAGE, BEFORE, skip=True)
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
        from core.metrics.registry import AFTER, BEFORE, scheduled
        from core.weights import export_backbone

        cfg, method = self.cfg, self.method
        values = {**self.init, **self.evaluate(AFTER)}
        evaluations = {s.key: values[s.key] for s in sorted(scheduled(STAGE, BEFORE) + scheduled(STAGE, AFTER),
                                                              key=lambda s: s.order)}
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
            **evaluations,  # the registered BEFORE / AFTER evaluations, in their declared order
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
