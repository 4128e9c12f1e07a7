"""What every self-supervised method shares, as a LightningModule base class.

`SSLMethod`: backbone construction (channels_last for CNNs, optional torch.compile, stochastic depth
`cfg.drop_path` for timm ViT / Swin), optional GPU batch augmentation of the views, optimiser +
per-step warmup/cosine lr schedule down to `cfg.min_lr` and, with `cfg.weight_decay_end`, a per-step
cosine weight decay on the decayed group set before every step (core/methods/optim.py; official DINO
`main_dino.py` sets `param_groups[0]["weight_decay"] = wd_schedule[it]` the same way), and the k-NN
monitor on the validation loaders `[knn_train, knn_val]` (core/methods/knn_monitor.py) that logs
`val/knn_acc`. A method (core/methods/<name>.py) subclasses it, builds its heads and loss
in `__init__`, writes `training_step`, and may override the hooks below; its registry entry
(`core.methods.registry.SSLMethodSpec`) declares the rest (config section, views, labels).

Hooks a method may override:
- `eval_backbone_attr`: the attribute holding the backbone that is evaluated and exported
  ("backbone"; DINO: "teacher_backbone", as DINO's evaluation uses the teacher);
- `result_metrics(loader, device) -> dict`: method-specific keys for metrics.json, computed after
  training on rank 0 alone (no collective call); `result_keys` documents each (key -> description,
  read by core/runs/metrics_schema.py);
- `diagnostic_callbacks(every_n_epochs) -> list`: method-specific Lightning diagnostics;
- `on_weights_loaded()`: called after a weight source was loaded into `self.backbone`;
- `collapse_reason(metrics) -> Optional[str]`: the method's declared collapse rule on the final metrics
  (default: core/diagnostics/collapse.py's embedding rule; DINO: its teacher's entropy), read by
  `collapse_metrics`, which adds `embedding_std` / `embedding_rank` / `collapsed` / `collapse_reason` to
  metrics.json and prints one warning line when the run collapsed.

Collapse monitors (every method): at the end of each validation epoch, before the k-NN accuracy, the
pooled features of the k-NN images give `val/embedding_std` and `val/embedding_rank`
(`core.diagnostics.collapse.embedding_stats`; this process' images, no collective call); the last
epoch's values are the metrics.json ones. `log_embedding_std(name, z)` logs the same std of a training
batch's embeddings (the methods with a projector log its output as `train/proj_std`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from core.methods.knn_monitor import KNNMonitorMixin, prepare_images
from core.methods.optim import apply_weight_decay, configure_optimizers, cosine_schedule

if TYPE_CHECKING:
    from core.config import PretrainConfig


def unpack_views(batch: Any) -> list[Tensor]:
    """The list of augmented views in an SSL batch (layouts: `core.data.batch`)."""
    from core.data.batch import views

    return views(batch)


class SSLMethod(KNNMonitorMixin, pl.LightningModule):
    """Shared plumbing of the pretraining methods. Subclasses build heads and `training_step`."""

    method_name = "ssl"
    eval_backbone_attr = "backbone"
    result_keys: dict[str, str] = {}  # metrics.json keys of `result_metrics` -> their description

    def __init__(self, cfg: PretrainConfig, num_train_batches: int = 1, gpu_augment: Optional[Sequence] = None,
                 backbone: Optional[nn.Module] = None):
        """`gpu_augment`: one callable per view (`core.data.gpu_augment.BatchAugment`, from the data
        loaders' `batch_augment`) applied to each view's batch on the device, or None when the CPU
        pipeline already did the whole recipe."""
        super().__init__()
        self.cfg = cfg
        self.num_train_batches = max(int(num_train_batches), 1)
        self.knn_k = cfg.knn_k
        if backbone is None:
            from core.models.registry import create_backbone

            # drop_path_rate only when asked: ResNet builders take no such option (config refuses it)
            extra = {"drop_path_rate": cfg.drop_path} if cfg.drop_path > 0 else {}
            backbone = create_backbone(cfg.backbone, image_size=cfg.data.image_size, **extra)
            backbone.check_input_size(cfg.data.image_size, cfg.data.image_size)
        self.backbone = backbone
        self.channels_last = not getattr(backbone, "is_transformer", True)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # kept out of the state dict / module tree (a plain tuple)
        self._gpu_aug = tuple(gpu_augment) if gpu_augment else ()
        self._compiled: Optional[tuple] = None
        self.last_knn_acc: Optional[float] = None
        # optimiser steps of the whole run (schedules read it); the trainer's estimate in configure_optimizers
        self._total_steps = self.num_train_batches * cfg.epochs

    # ------------------------------------------------------------------ helpers
    def encoder(self) -> nn.Module:
        """The backbone used in the training forward (compiled when cfg.compile)."""
        if self.cfg.compile:
            if self._compiled is None:
                self._compiled = (torch.compile(self.backbone),)
            return self._compiled[0]
        return self.backbone

    def prepare_view(self, x: Tensor, index: int = 0) -> Tensor:
        if self._gpu_aug:  # uint8 views from the loader: the batch augment converts, augments and normalises
            x = x.to(self.device, non_blocking=True)
            aug = self._gpu_aug[min(index, len(self._gpu_aug) - 1)]
            with torch.no_grad():
                x = aug(x)
        else:  # float views are normalised already; uint8 ones are normalised here
            x = prepare_images(x, self.device)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def knn_backbone(self) -> nn.Module:
        return getattr(self, self.eval_backbone_attr)

    def export_backbone(self) -> nn.Module:
        """The backbone written to backbone.pt and evaluated by the k-NN monitor."""
        return self.knn_backbone()

    def optimized_module(self) -> nn.Module:  # what the optimiser updates
        return self

    def setup(self, stage: str) -> None:
        """Under DDP, BatchNorm layers become SyncBatchNorm (official Barlow Twins / DINO); this hook
        runs before Lightning wraps the module in DistributedDataParallel. Not on CPU ranks (gloo,
        tests): torch's SyncBatchNorm refuses CPU tensors, so each rank normalises its own batch."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1 and trainer.strategy.root_device.type != "cpu":
            for name, child in list(self.named_children()):
                setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))

    def on_weights_loaded(self) -> None:
        """Called after a weight source was loaded into `self.backbone` (DINO: copy to the teacher)."""

    def result_metrics(self, loader, device) -> dict:
        """Method-specific metrics.json entries (keys: `result_keys`), after training, rank 0 alone."""
        return {}

    def diagnostic_callbacks(self, every_n_epochs: int) -> list:
        """Method-specific diagnostic callbacks (figures every `every_n_epochs` epochs)."""
        return []

    # ------------------------------------------------------------------ collapse monitors
    #: metrics a method's `collapse_reason` reads; `collapsed` is null when none of them was measured
    collapse_monitor_keys: tuple[str, ...] = ("embedding_std", "embedding_rank")

    def on_validation_epoch_end(self) -> None:
        """The embedding statistics of the k-NN images' pooled features (before the k-NN monitor, which
        clears its feature store), then the k-NN accuracy."""
        from core.diagnostics.collapse import embedding_stats

        store = getattr(self, "_knn_store", {})
        feats = [f for idx in sorted(store) for f, _ in store[idx]]
        z = torch.cat(feats) if feats else None
        if z is not None and z.ndim == 2 and z.shape[0] >= 2:
            for name, value in embedding_stats(z.float().cpu()).items():
                self.log(f"val/{name}", value, on_epoch=True, sync_dist=False, add_dataloader_idx=False)
        super().on_validation_epoch_end()

    def log_embedding_std(self, name: str, z: Tensor) -> None:
        """Log the embedding std (core/diagnostics/collapse.py) of a training batch's embeddings per epoch."""
        from core.diagnostics.collapse import embedding_std_tensor

        if z.ndim == 2 and z.shape[0] >= 2:
            self.log(name, embedding_std_tensor(z), on_step=False, on_epoch=True, batch_size=z.shape[0])

    def logged_metric(self, name: str) -> Optional[float]:
        """The last value logged under `name` (epoch mean for on_epoch logs), None when never logged."""
        logged = self.trainer.callback_metrics if self._trainer is not None else {}
        return float(logged[name]) if name in logged else None

    def collapse_reason(self, metrics: dict) -> Optional[str]:
        """The declared collapse rule: a one-line reason when the run collapsed, else None. Default: the
        embedding rule of core/diagnostics/collapse.py (embedding_std < 0.05 or embedding_rank < 2)."""
        from core.diagnostics.collapse import embedding_collapse_reason

        return embedding_collapse_reason(metrics)

    def collapse_metrics(self, metrics: dict) -> dict:
        """`embedding_std`, `embedding_rank` (last validation epoch), `collapsed` (true / false; null when
        no monitor the rule reads was measured) and `collapse_reason` (null unless collapsed), given the
        run's other final metrics (`result_metrics`' keys included). Prints one warning line on collapse."""
        import sys

        out: dict[str, Any] = {"embedding_std": self.logged_metric("val/embedding_std"),
                               "embedding_rank": self.logged_metric("val/embedding_rank")}
        merged = {**metrics, **out}
        reason = self.collapse_reason(merged)
        measured = reason is not None or any(merged.get(k) is not None for k in self.collapse_monitor_keys)
        out["collapsed"] = (reason is not None) if measured else None
        out["collapse_reason"] = reason
        if reason is not None:
            print(f"twinseg: warning: {self.method_name} pretraining collapsed: {reason}", file=sys.stderr, flush=True)
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        cfg = self.cfg
        try:
            total = int(self.trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - no trainer (unit use)
            total = self.num_train_batches * cfg.epochs
        if not math.isfinite(total) or total <= 0:
            total = self.num_train_batches * cfg.epochs
        steps_per_epoch = max(1, total // max(cfg.epochs, 1))
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        world = getattr(getattr(self, "_trainer", None), "world_size", 1) or 1
        self._total_steps = total
        return configure_optimizers(self.optimized_module(), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                    cfg.batch_size * world, total, warmup, min_lr=cfg.min_lr)

    def weight_decay_at(self, step: int) -> float:
        """Weight decay of the decayed group at optimisation step `step`: cfg.weight_decay, or with
        cfg.weight_decay_end a cosine from weight_decay (step 0) to weight_decay_end (last step)."""
        cfg = self.cfg
        if cfg.weight_decay_end is None:
            return cfg.weight_decay
        return cosine_schedule(step, self._total_steps, cfg.weight_decay, cfg.weight_decay_end)

    def on_train_batch_start(self, batch, batch_idx):
        """Before each optimiser step (official DINO: before the forward): the scheduled weight decay."""
        if self.cfg.weight_decay_end is None:
            return None
        wd = self.weight_decay_at(self.global_step)
        for opt in self._optimizers():
            apply_weight_decay(opt, wd)
        self.log("train/weight_decay", wd, on_step=False, on_epoch=True, batch_size=1)
        return None

    def _optimizers(self) -> list:
        opts = self.optimizers(use_pl_optimizer=False)
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]
