"""DINO pretraining as a LightningModule (official `main_dino.py`, facebookresearch/dino).

- student = backbone + DINOHead; teacher = deep copy of both, no gradients, updated after every
  optimiser step by EMA: t <- m t + (1 - m) s, with m following a cosine schedule from
  `cfg.dino.momentum` (0.996) to 1 over all training steps;
- stochastic depth (`cfg.drop_path`, official ViT-S 0.1) in the student only: official
  `main_dino.py` builds the teacher without `drop_path_rate`; here the teacher's DropPath modules
  (copied with the student) are set to drop nothing (`core.models.registry.disable_drop_path`);
- the official ViT-S/16 optimisation (main_dino.py defaults) is `PretrainConfig` settings: AdamW,
  lr 0.0005 x batch/256 (lr none) with 10 warmup epochs, cosine to `min_lr` 1e-6, weight decay
  cosine 0.04 -> `weight_decay_end` 0.4 on the decayed group (core/methods/ssl_base.py); the paper
  grid (experiments/grids/paper.yaml) sets them;
- the teacher sees the 2 global crops only; the student sees every crop (global + local), crops of
  one resolution forwarded together (the official MultiCropWrapper);
- DINOLoss with centering and teacher-temperature warmup (`dino.warmup_teacher_temp` ->
  `dino.teacher_temp` over `dino.warmup_teacher_temp_epochs`), student temperature 0.1;
- the last layer of the student head is frozen during the first `freeze_last_layer` epoch(s) and
  gradients are clipped per parameter to norm 3.0 (official defaults);
- the k-NN monitor and backbone.pt use the TEACHER backbone, as DINO's evaluation does;
- the head's last layer is weight-normalised with its magnitude frozen at 1 unless `dino.norm_last_layer` is
  false (main_dino.py `--norm_last_layer`; its README's ViT-S/16 300-epoch run: false);
- the collapse flag (`collapse_reason`): uniform or one-hot teacher (entropy rules) or KL(teacher || student)
  below `KL_MIN` (both collapses of the DINO paper, section 5.3).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor, nn

from core.config import ConfigBase, check_positive, check_range
from core.losses.dino import DINOLoss
from core.methods.optim import cosine_schedule
from core.methods.registry import SSLMethodSpec
from core.models.registry import disable_drop_path
from core.methods.ssl_base import SSLMethod, unpack_views

if TYPE_CHECKING:
    from core.config import PretrainConfig

CLIP_GRAD = 3.0
FREEZE_LAST_LAYER_EPOCHS = 1
UNIFORM_ENTROPY_FRACTION = 0.9  # collapse rule: teacher entropy >= this x ln K (DINOMethod.collapse_reason)
ONE_HOT_BATCH_ENTROPY = math.log(2)  # collapse rule: batch-averaged teacher entropy below this
KL_MIN = 0.1  # collapse rule: KL(teacher || student) below this many nats (DINOMethod.collapse_reason)


def clip_gradients_per_param(module: nn.Module, clip: float) -> None:
    """Official DINO `utils.clip_gradients`: each parameter's gradient rescaled to norm <= clip."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    # batched and branch-free: no host-device sync per parameter
    norms = torch._foreach_norm(grads, 2)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


@dataclass(frozen=True)
class DINOOptions(ConfigBase):
    """DINO options (`PretrainConfig.dino`); official ViT-S/16 values noted where they differ."""

    section = "dino"

    out_dim: int = 1024
    """Output dimension K of the DINO head (official 65536)."""
    teacher_temp: float = 0.02
    """Teacher softmax temperature after the warmup (main_dino.py default 0.04; its README's ViT-S/16 300-epoch
    run, the paper grid: 0.07 after a 30-epoch warmup). 0.02: the CPU recipe. A random tiny ViT's teacher is
    already ~0.9 ln K at 0.04 (0.97 at 0.07, 0.69 at 0.02) and a short run at 0.04-0.07 ends in the uniform
    collapse (docs/findings.md, "DINO's uniform collapse on the CPU")."""
    warmup_teacher_temp: float = 0.02
    """Teacher temperature at the start of the warmup (official 0.04; the CPU recipe: no warmup, 0.02)."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of linear teacher-temperature warmup (official 30 with teacher_temp 0.07; capped at the run's
    epochs; the CPU recipe: 0)."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    momentum: float = 0.996
    """Initial EMA momentum of the teacher (cosine schedule to 1). main_dino.py's 0.996 is for its batch of 1024;
    its help: "We recommend setting a higher value with small batches: for example use 0.9995 with batch size of
    256" (the paper grid, batch 128: 0.9995)."""
    norm_last_layer: bool = True
    """Weight-normalise the head's last layer with its magnitude frozen at 1 (main_dino.py default true). false:
    the magnitude is learnt, main_dino.py: "Not normalizing leads to better performance but can make the training
    unstable ... we typically set this paramater to False with vit_small"; its README's 300-epoch ViT-S/16 run
    (the paper grid) uses `--norm_last_layer false`."""
    local_crops: int = 2
    """Number of small local crops per image besides the 2 global ones (official 10 at 96 px)."""

    def validate(self) -> None:
        check_positive("dino.out_dim", self.out_dim)
        check_positive("dino.teacher_temp", self.teacher_temp)
        check_positive("dino.warmup_teacher_temp", self.warmup_teacher_temp)
        check_positive("dino.warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs, allow_zero=True)
        check_positive("dino.student_temp", self.student_temp)
        check_range("dino.momentum", self.momentum, 0.0, 1.0)
        check_positive("dino.local_crops", self.local_crops, allow_zero=True)


def multicrop_views(cfg: PretrainConfig, gpu_augment: bool):
    """2 global crops at the image size + `dino.local_crops` local crops at DINO's 96/224 ratio."""
    from core.data.transforms import DINOTransform, default_local_size

    size = cfg.data.image_size
    return DINOTransform(size, default_local_size(size), cfg.dino.local_crops, gpu_augment=gpu_augment)


class DINOMethod(SSLMethod):
    method_name = "dino"
    eval_backbone_attr = "teacher_backbone"
    result_keys = {
        "teacher_entropy": "DINO: entropy of the teacher's output distribution, last epoch's mean (ln K: uniform "
                           "collapse, 0: one-hot collapse; DINO paper section 5.3)",
        "teacher_student_kl": "DINO: KL(teacher || student), last epoch's mean (0 in either collapse; collapse "
                              "flagged below 0.1 nats)",
        "teacher_entropy_uniform": "DINO: ln K, the teacher entropy of a uniform collapse (K = dino.out_dim)",
        "teacher_batch_entropy": "DINO: entropy of the teacher's distribution averaged over each batch, last epoch's "
                                 "mean (ln of the output dimensions a batch uses; 0: one-hot collapse)",
    }
    collapse_monitor_keys = ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "embedding_std",
                             "embedding_rank")

    def __init__(self, cfg: PretrainConfig, num_train_batches: int = 1, gpu_augment: Optional[Sequence] = None,
                 backbone: Optional[nn.Module] = None, head_hidden: Optional[int] = None,
                 head_bottleneck: Optional[int] = None, clip_grad: float = CLIP_GRAD,
                 freeze_last_layer: int = FREEZE_LAST_LAYER_EPOCHS):
        super().__init__(cfg, num_train_batches, gpu_augment, backbone)
        from core.models.dino_head import DINOHead

        # official 2048 / 256; scaled down with the projector widths for small configurations
        hidden = head_hidden or min(2048, max(cfg.projector))
        bottleneck = head_bottleneck or min(256, hidden)
        opts = cfg.dino
        self.head = DINOHead(self.backbone.embed_dim, opts.out_dim, hidden=hidden, bottleneck=bottleneck,
                             norm_last_layer=opts.norm_last_layer)
        self.teacher_backbone = copy.deepcopy(self.backbone)
        disable_drop_path(self.teacher_backbone)  # stochastic depth is the student's only (official)
        self.teacher_head = copy.deepcopy(self.head)
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(
            opts.out_dim,
            teacher_temp=opts.teacher_temp,
            warmup_teacher_temp=opts.warmup_teacher_temp,
            warmup_teacher_temp_epochs=min(opts.warmup_teacher_temp_epochs, cfg.epochs),
            n_epochs=cfg.epochs,
            student_temp=opts.student_temp,
        )
        self.clip_grad = float(clip_grad)
        self.freeze_last_layer = int(freeze_last_layer)

    # ------------------------------------------------------------------ modules
    def student_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def optimized_module(self) -> nn.Module:
        return self.student_modules()

    def on_weights_loaded(self) -> None:
        """Teacher and student start from the same weights (official)."""
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_head.load_state_dict(self.head.state_dict())

    def _pairs(self):
        """(student param, teacher param) pairs, backbone then head (EMA)."""
        for s_mod, t_mod in ((self.backbone, self.teacher_backbone), (self.head, self.teacher_head)):
            yield from zip(s_mod.parameters(), t_mod.parameters())

    # ------------------------------------------------------------------ forward
    def _multicrop(self, encoder: nn.Module, head: nn.Module, crops: list[Tensor]) -> Tensor:
        """Forward crops grouped by resolution (one backbone pass per size), head on all at once."""
        feats, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            feats.append(encoder(torch.cat(crops[i:j])))
            i = j
        return head(torch.cat(feats))

    def training_step(self, batch, batch_idx):
        views = [self.prepare_view(v, i) for i, v in enumerate(unpack_views(batch))]
        if len(views) < 2:
            raise ValueError("DINO needs at least 2 global crops per image")
        global_views = views[:2]
        with torch.no_grad():
            self.teacher_backbone.train(self.backbone.training)
            teacher_out = self._multicrop(self.teacher_backbone, self.teacher_head, global_views)
        student_out = self._multicrop(self.encoder(), self.head, views)
        loss = self.loss_fn(student_out, teacher_out, self.current_epoch)
        bs = views[0].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/teacher_temp", self.loss_fn.teacher_temp_at(self.current_epoch), on_step=False,
                 on_epoch=True, batch_size=bs)
        for name, value in self.loss_fn.last_stats.items():  # collapse monitors (DINO paper, section 5.3)
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def result_metrics(self, loader, device) -> dict:
        """The collapse monitors of the last training epoch (logged per epoch as train/teacher_entropy,
        train/teacher_student_kl, train/teacher_batch_entropy) and ln K for reference."""
        out = {k: self.logged_metric(f"train/{k}")
               for k in ("teacher_entropy", "teacher_student_kl", "teacher_batch_entropy")}
        out["teacher_entropy_uniform"] = math.log(self.cfg.dino.out_dim)
        return out

    def collapse_reason(self, metrics: dict) -> Optional[str]:
        """DINO's two collapses (paper section 5.3), read on the teacher's output over the last epoch:
        - uniform: `teacher_entropy >= UNIFORM_ENTROPY_FRACTION (0.9) x ln K`. A randomly initialised
          teacher already sits at ~0.90 ln K at temperature 0.04 (measured: vit_nano_patch8, K 256, 64 px:
          0.896; 0.968 at 0.07), so a teacher that ends there learnt no sharper, image-specific targets
          than a random network gives (its targets spread over >= K^0.9 of the K dimensions);
        - one-hot: `teacher_batch_entropy < ln 2`: the batch's averaged teacher output uses fewer than 2
          output dimensions, i.e. every image gets the same target (the per-image entropy is then ~0 too;
          a healthy sharp teacher has a low per-image entropy but a high batch entropy);
        - either (the KL rule): `teacher_student_kl < KL_MIN` (0.1 nats). KL(teacher || student) goes to 0 in
          both collapses (paper section 5.3, Fig. 7): the student reproduces the teacher's targets and the loss
          gives it nothing left to learn. Its gradient with respect to the student's logits is (p - q) / tau_s,
          and by Pinsker's inequality ||p - q||_1 <= sqrt(2 KL) = 0.45 at 0.1 nats. Measured on vit_nano_patch8 at
          64 px: runs that learn end at 0.74 nats (the smoke DINO trial, K 256: README's loss 4.18 minus its
          teacher entropy 0.62 ln K), 0.85 (`experiments/pretrain.py --method dino`, K 1024; docs/findings.md) and
          1.48 (the same with `--epochs 2`); a uniform collapse (that command at lr 2e-3 with teacher temperature
          0.04 -> 0.07 over 2 epochs, 4 epochs) fell 0.59, 0.11, 0.054, 0.050 per epoch. 0.1 sits 2x above that
          collapsed plateau and 7x below the lowest learning run. This rule
          catches a collapse that the entropy rules do not yet (e.g. a teacher at 0.85 ln K whose student
          already matches it);
        then the embedding rule every method shares (core/diagnostics/collapse.py)."""
        h, h_batch = metrics.get("teacher_entropy"), metrics.get("teacher_batch_entropy")
        ln_k = math.log(self.cfg.dino.out_dim)
        if h is not None and h >= UNIFORM_ENTROPY_FRACTION * ln_k:
            return (f"uniform collapse: teacher_entropy {h:.3f} >= {UNIFORM_ENTROPY_FRACTION} x ln K "
                    f"({UNIFORM_ENTROPY_FRACTION * ln_k:.3f}, K={self.cfg.dino.out_dim}): the teacher's targets "
                    "are nearly uniform")
        if h_batch is not None and h_batch < ONE_HOT_BATCH_ENTROPY:
            return (f"one-hot collapse: teacher_batch_entropy {h_batch:.3f} < ln 2: every image gets the same "
                    "teacher target")
        kl = metrics.get("teacher_student_kl")
        if kl is not None and kl < KL_MIN:
            near = f" (teacher_entropy {h / ln_k:.2f} ln K)" if h is not None else ""
            return (f"collapse: teacher_student_kl {kl:.4f} < {KL_MIN} nats: the student reproduces the teacher's "
                    f"targets{near}, DINO's sign of both collapses")
        return super().collapse_reason(metrics)

    # ------------------------------------------------------------------ official training details
    def on_before_optimizer_step(self, optimizer) -> None:
        if self.clip_grad > 0:
            clip_gradients_per_param(self.student_modules(), self.clip_grad)
        if self.current_epoch < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def teacher_momentum(self, step: int) -> float:
        return cosine_schedule(step, self._total_steps, self.cfg.dino.momentum, 1.0)

    @torch.no_grad()
    def ema_update(self, m: float) -> None:
        student, teacher = zip(*self._pairs())
        torch._foreach_lerp_(list(teacher), [p.detach() for p in student], 1.0 - m)  # t = m t + (1-m) s

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # global_step was incremented by the optimiser step just taken: the schedule index is step-1
        m = self.teacher_momentum(max(self.global_step - 1, 0))
        self.ema_update(m)
        self.log("train/teacher_momentum", m, on_step=False, on_epoch=True, batch_size=1)


METHOD = SSLMethodSpec(
    name="dino", label="DINO", short="dino",
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021",
    options=DINOOptions, module=DINOMethod, views=multicrop_views, order=10,
    # the CPU recipe: AdamW at lr 5e-4 with DINO's weight decay 0.04; at the shared default lr 2e-3 the
    # student's noisy batch-32 steps average into a flat teacher: uniform collapse (docs/findings.md)
    defaults={"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04},
)
