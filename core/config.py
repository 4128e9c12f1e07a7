"""Typed, validated run configuration.

Each run is described by a frozen dataclass validated at construction: a bad value raises
`ConfigError` naming the field, the bad value and what is allowed. `from_dict` is how CLI flags and
grid files become configs; unknown keys are refused (no silent typos). No string is ever evaluated
as code: names are looked up in registries.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from core.errors import ConfigError

METHODS = ("barlow_twins", "dino")
OPTIMIZERS = ("lars", "adamw")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
DEVICES = ("auto", "cpu", "cuda")
DATASETS = ("voc", "coco_stuff", "imagefolder")
SSL_SPLITS = ("train", "trainaug", "all_but_val")
COCO_LABELS = ("fine", "coarse")
CORRUPT_POLICIES = ("stop", "skip")
SEG_MODES = ("frozen", "finetune")
SEG_LOSSES = ("ce", "dice", "focal")
FUSIONS = ("none", "features", "affinity")
INFERENCE = ("whole", "slide")
WANDB_MODES = ("offline", "online", "disabled")
BASE_SOURCES = ("random", "imagenet", "barlowtwins-imagenet", "dino", "coco-deeplab")


# --------------------------------------------------------------------------- checks
def _fmt(v: Any) -> str:
    return repr(v)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={_fmt(value)} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        need = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={_fmt(value)} must be {need}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (lo <= value <= hi):
        raise ConfigError(f"{name}={_fmt(value)} must be between {lo} and {hi}")


def check_source(name: str, value: str) -> None:
    if value in BASE_SOURCES or (isinstance(value, str) and value.startswith("checkpoint:") and len(value) > 11):
        return
    raise ConfigError(
        f"{name}={_fmt(value)} is not a weight source; choose one of: {', '.join(BASE_SOURCES)}, checkpoint:PATH"
    )


# --------------------------------------------------------------------------- coercion
def _coerce(cls_name: str, fname: str, tp: Any, value: Any) -> Any:
    """Coerce `value` (e.g. from YAML/CLI) to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{cls_name}.{fname}" if cls_name else fname
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(cls_name, fname, inner[0], value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value)
        raise ConfigError(f"{where}={_fmt(value)} must be a mapping of {tp.__name__} fields")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", "-").split("-") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={_fmt(value)} must be a list")
        return tuple(_coerce(cls_name, fname, args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={_fmt(value)} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={_fmt(value)} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={_fmt(value)} must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={_fmt(value)} must be a number")
        if isinstance(value, (int, float)):
            out = float(value)
        else:
            try:
                out = float(str(value))
            except ValueError:
                raise ConfigError(f"{where}={_fmt(value)} must be a number") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}={_fmt(value)} must be a finite number")
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}={_fmt(value)} must be a string")
    return value


class ConfigBase:
    """Mixin: construction-time coercion + validation, dict round-trip, unknown-key refusal."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _coerce(type(self).__name__, f.name, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:  # overridden
        pass

    @classmethod
    def from_dict(cls, d: Optional[dict] = None, **overrides: Any):
        d = dict(d or {})
        d.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; allowed fields: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Where images come from. root=None means the generated (synthetic, VOC-layout) dataset."""

    dataset: str = "voc"
    root: Optional[str] = None  # VOC: folder holding VOCdevkit/ (or VOC2012/); COCO: cocostuff root
    ssl_split: str = "train"  # images for self-supervision (voc): train | trainaug | all_but_val
    ssl_root: Optional[str] = None  # optional ImageFolder tree used for self-supervision instead
    image_size: int = 64
    num_workers: int = 0
    coco_labels: str = "coarse"
    corrupt_policy: str = "stop"  # stop at the first corrupt file, or skip and count it
    # Smallest RandomResizedCrop area of the self-supervised views. None: the official 0.08 on real
    # data, 0.25 on generated data (root None, or a root written by core.data.synthetic): an 8% crop
    # of 64 px is ~18 px, smaller than most objects, so the two views rarely share one.
    crop_scale_min: Optional[float] = None
    limit_train: Optional[int] = None  # use only the first N train images (debug / smoke)
    limit_val: Optional[int] = None
    synthetic_n_train: int = 400  # size of the generated dataset when root is None
    synthetic_n_val: int = 200
    synthetic_seed: int = 0

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.ssl_split", self.ssl_split, SSL_SPLITS)
        check_choice("data.coco_labels", self.coco_labels, COCO_LABELS)
        check_choice("data.corrupt_policy", self.corrupt_policy, CORRUPT_POLICIES)
        check_range("data.image_size", self.image_size, 16, 4096)
        if self.crop_scale_min is not None:
            check_range("data.crop_scale_min", self.crop_scale_min, 0.01, 1.0)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        for n in ("limit_train", "limit_val"):
            v = getattr(self, n)
            if v is not None:
                check_positive(f"data.{n}", v)
        check_positive("data.synthetic_n_train", self.synthetic_n_train)
        check_positive("data.synthetic_n_val", self.synthetic_n_val)

    def ssl_crop_scale(self) -> tuple[float, float]:
        if self.crop_scale_min is not None:
            return (self.crop_scale_min, 1.0)
        return (0.25, 1.0) if self.root is None or self.is_generated_root() else (0.08, 1.0)

    def is_generated_root(self) -> bool:
        """True when `root` holds a dataset written by core.data.synthetic (its marker file)."""
        if self.root is None:
            return True
        from pathlib import Path

        from core.data.synthetic import MARKER

        r = Path(self.root)
        return any((d / MARKER).is_file() for d in (r, r / "VOCdevkit", r.parent))


# --------------------------------------------------------------------------- stage 1
@dataclass(frozen=True)
class PretrainConfig(ConfigBase):
    """Stage 1: self-supervised pretraining (Barlow Twins or DINO)."""

    method: str = "barlow_twins"
    backbone: str = "vit_nano_patch8"
    source: str = "random"
    # Barlow Twins
    lambd: float = 0.0051
    scale: float = 1.0
    projector: tuple[int, ...] = (512, 512)  # official: 8192-8192-8192
    # DINO
    dino_out_dim: int = 1024
    dino_teacher_temp: float = 0.07
    dino_warmup_teacher_temp: float = 0.04
    dino_warmup_teacher_temp_epochs: int = 2
    dino_student_temp: float = 0.1
    dino_momentum: float = 0.996
    dino_local_crops: int = 2
    # optimisation
    # The defaults are the CPU setting tuned on the generated data (batch 32: LARS is made for
    # large batches). lr=None selects the official recipe: LARS 0.2 weights / 0.0048 biases x
    # batch/256 (what the paper grid uses), AdamW 5e-4 x batch/256 (DINO).
    optimizer: str = "adamw"
    lr: Optional[float] = 2e-3
    weight_decay: float = 1.5e-6
    epochs: int = 20
    warmup_epochs: float = 1.0
    batch_size: int = 32
    precision: str = "32"
    device: str = "auto"
    devices: int = 1  # GPUs per trial (DDP when > 1)
    compile: bool = False
    gpu_augment: bool = True  # colour/blur/solarize on whole batches on the device
    seed: int = 0
    # monitors / diagnostics
    knn_k: int = 20
    diagnostics_every: int = 0  # epochs between diagnostic figures (0: only at the end)
    wandb: str = "offline"
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        from core.models.registry import check_backbone_name  # late import: registry is heavy

        check_choice("method", self.method, METHODS)
        check_backbone_name("backbone", self.backbone)
        check_source("source", self.source)
        check_positive("lambd", self.lambd, allow_zero=True)
        check_positive("scale", self.scale)
        if not self.projector:
            raise ConfigError("projector=() must list at least one layer width, e.g. 8192-8192-8192")
        for w in self.projector:
            check_positive("projector (layer width)", w)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None:
            check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("epochs", self.epochs)
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 2 (Barlow Twins normalises over the batch)")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_positive("devices", self.devices)
        check_positive("dino_out_dim", self.dino_out_dim)
        check_positive("dino_teacher_temp", self.dino_teacher_temp)
        check_positive("dino_warmup_teacher_temp", self.dino_warmup_teacher_temp)
        check_positive("dino_warmup_teacher_temp_epochs", self.dino_warmup_teacher_temp_epochs, allow_zero=True)
        check_positive("dino_student_temp", self.dino_student_temp)
        check_range("dino_momentum", self.dino_momentum, 0.0, 1.0)
        check_positive("dino_local_crops", self.dino_local_crops, allow_zero=True)
        check_positive("knn_k", self.knn_k)
        check_positive("diagnostics_every", self.diagnostics_every, allow_zero=True)
        check_choice("wandb", self.wandb, WANDB_MODES)


# --------------------------------------------------------------------------- stage 2
@dataclass(frozen=True)
class SegmentConfig(ConfigBase):
    """Stage 2: semantic segmentation on top of a (pretrained) backbone."""

    evaluation: Optional[str] = None  # E1..E5 preset (core.evaluations); explicit fields override it
    backbone: str = "vit_nano_patch8"
    head: str = "setr_pup"
    fusion: str = "none"  # none | features (fusion 1) | affinity (fusion 2)
    fusion_blocks: int = 1  # fusion 1: CLS attention of the last K blocks
    fusion_steps: int = 2  # fusion 2: propagation steps t
    # fusion 2: initial mixing a (learnable). Starts near the plain head and lets training open the
    # gate: from 0.5, on the smoke grid's 10-epoch Barlow Twins ViT (near-uniform attention), a first
    # ROSE (blurring helps while the head predicts mostly background) and E4 stuck at 4.5 mIoU; from
    # 0.1 the gate closed and E4 matched E2 (20.4).
    fusion_alpha: float = 0.1
    # fusion 2: learning rate of a's logit. A scalar gate needs larger steps than the weights to cross
    # its range in a short fine-tune: at the head lr (1e-3) AdamW moves it < 0.1 in 100 steps, so a
    # stayed at its initial 0.5 even where the attention is uninformative.
    fusion_alpha_lr: float = 0.05
    source: str = "random"
    mode: str = "finetune"
    loss: str = "ce"
    epochs: int = 8
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # fine-tune: backbone lr = lr * scale
    weight_decay: float = 1e-4
    batch_size: int = 16
    precision: str = "32"
    device: str = "auto"
    devices: int = 1
    compile: bool = False
    inference: str = "whole"
    slide_crop: int = 64
    slide_stride: int = 48
    seed: int = 0
    diagnostics_every: int = 0
    wandb: str = "offline"
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        from core.models.registry import check_backbone_name
        from core.models.heads import check_head_name

        if self.evaluation is not None:
            check_choice("evaluation", self.evaluation, ("E1", "E2", "E3", "E4", "E5"))
        check_backbone_name("backbone", self.backbone)
        check_head_name("head", self.head)
        check_choice("fusion", self.fusion, FUSIONS)
        check_positive("fusion_blocks", self.fusion_blocks)
        check_positive("fusion_steps", self.fusion_steps)
        check_range("fusion_alpha", self.fusion_alpha, 0.0, 1.0)
        check_positive("fusion_alpha_lr", self.fusion_alpha_lr, allow_zero=True)
        check_source("source", self.source)
        check_choice("mode", self.mode, SEG_MODES)
        check_choice("loss", self.loss, SEG_LOSSES)
        check_positive("epochs", self.epochs)
        check_positive("lr", self.lr)
        check_positive("backbone_lr_scale", self.backbone_lr_scale, allow_zero=True)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("batch_size", self.batch_size)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_positive("devices", self.devices)
        check_choice("inference", self.inference, INFERENCE)
        check_positive("slide_crop", self.slide_crop)
        check_positive("slide_stride", self.slide_stride)
        if self.slide_stride > self.slide_crop:
            raise ConfigError(
                f"slide_stride={self.slide_stride} must be <= slide_crop={self.slide_crop} (windows must overlap or touch)"
            )
        check_positive("diagnostics_every", self.diagnostics_every, allow_zero=True)
        check_choice("wandb", self.wandb, WANDB_MODES)
