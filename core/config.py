"""Typed, validated run configuration: the one home of every run setting and its default.

Each run is described by a frozen dataclass validated at construction: a bad value raises
`ConfigError` naming the field, the bad value and what is allowed. `from_dict` is how CLI flags and
grid files become configs; unknown keys are refused (no silent typos). No string is ever evaluated
as code: names are looked up in registries.

- Every field carries its documentation as an attribute docstring (the string right after it): the
  CLI (core/config_cli.py) turns each field into a flag with that text as its help, and
  `field(metadata={"cli_aliases": (...)})` adds short flag names; `metadata={"bookkeeping": True}` marks
  a field that does not change the result (wandb, keep_checkpoints): a finished or unfinished run folder
  is reused whatever its value (core/runs/skeleton.py `config_differences`).
- A field whose type is a ConfigBase dataclass is a section (`data`, and one per SSL method):
  nested in config.json and grid files, `--<section>-<field>` on the CLI.
- Settings both stages share (backbone, source, epochs, batch_size, precision, device, seed, wandb, data...)
  are declared once in `RunSettings`; `PretrainSettings` and `SegmentConfig` derive from it and place each
  with `name = shared()` (a per-stage default: `shared(default=...)`), keeping their own field order.
- `PretrainConfig` is `PretrainSettings` plus one section per registered SSL method
  (core/methods/registry.py), built on first use: adding a method adds its options here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

from core.errors import ConfigError

OPTIMIZERS = ("lars", "adamw")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
DEVICES = ("auto", "cpu", "cuda")
DATASETS = ("voc", "coco_stuff", "imagefolder")
SEG_DATASETS = ("voc", "coco_stuff")  # the DATASETS with masks: what segmentation trains and scores on
SSL_SPLITS = ("train", "trainaug", "all_but_val")
COCO_LABELS = ("fine", "coarse")
CORRUPT_POLICIES = ("stop", "skip")
SEG_MODES = ("frozen", "finetune")
SEG_LOSSES = ("ce", "dice", "focal")
FUSIONS = ("none", "features", "affinity")
INFERENCE = ("whole", "slide")
SEG_TRAIN_PIPELINES = ("simple", "mmseg")  # == core.data.transforms.SEG_TRAIN_PIPELINES (no torch import here)
SEG_TRAIN_SPLITS = ("train", "trainaug")
SEG_SCHEDULES = ("cosine", "poly")
WANDB_MODES = ("offline", "online", "disabled")
#: THE list of weight source names (core/weights.py: `SOURCES`, and its WEIGHT_SPECS hold files for these)
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


#: bounds of the numeric run settings: beyond them a value is a typo or an overflow, not a setting (numpy seeds
#: are 32-bit; a float learning rate above LR_MAX overflows the schedules and the optimiser's update)
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 100_000
BATCH_SIZE_MAX = 65_536
MAX_ITERS_MAX = 100_000_000
LR_MAX = 1e6
WEIGHT_DECAY_MAX = 100.0


def check_bounds(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    """`value` must lie in [lo, hi] ((lo, hi] with `lo_open`): one line naming the field, the value and the
    bounds."""
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        def num(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"

        low = f"> {num(lo)}" if lo_open else f">= {num(lo)}"
        raise ConfigError(f"{name}={_fmt(value)} is out of range: it must be {low} and <= {num(hi)}")


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
    """Mixin: construction-time coercion + validation, dict round-trip, unknown-key refusal.

    `section`: the key under which this dataclass is nested in a parent config ("data", "dino", ...);
    error messages then name fields as the user writes them (`data.image_size=...`)."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        where = type(self).section or type(self).__name__
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _coerce(where, f.name, hints[f.name], getattr(self, f.name)))
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

    @classmethod
    def sections(cls) -> dict[str, type]:
        """The nested sections of this config: field name -> its ConfigBase dataclass."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if isinstance(hints[f.name], type) and issubclass(hints[f.name], ConfigBase)}

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


WANDB_INIT_TIMEOUT_S = 30.0  # default wait for `wandb.init` online (wandb's own: 90 s plus retries)


def check_wandb(mode: str) -> Optional[float]:
    """`wandb=online` needs credentials (WANDB_API_KEY, or a `wandb login` entry in ~/.netrc for the wandb
    host) and a key of the form wandb accepts: ConfigError (one line) otherwise, before anything is built or
    written; wandb itself would fail deep inside the first logging call with a long traceback.
    Returns the seconds `wandb.init` may wait for the server when online ($TWINSEG_WANDB_INIT_TIMEOUT,
    default WANDB_INIT_TIMEOUT_S), None otherwise."""
    if mode != "online":
        return None
    raw = os.environ.get("TWINSEG_WANDB_INIT_TIMEOUT", "").strip()
    try:
        timeout = float(raw) if raw else WANDB_INIT_TIMEOUT_S
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < float("inf"):  # NaN fails too
        raise ConfigError(f"TWINSEG_WANDB_INIT_TIMEOUT={raw!r} must be a number of seconds > 0 (how long wandb=online "
                          f"waits for the wandb server; unset: {WANDB_INIT_TIMEOUT_S:g})")
    key = os.environ.get("WANDB_API_KEY")
    if key:
        problem = _wandb_key_problem(key)
        if problem:
            raise ConfigError(f"wandb=online: WANDB_API_KEY is not a wandb API key ({problem}); export the key "
                              "shown at https://wandb.ai/authorize, or use --wandb offline and `wandb sync` later")
        return timeout
    from urllib.parse import urlparse

    from pathlib import Path

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if host in netrc.read_text(errors="ignore"):
            return timeout
    except OSError:
        pass
    raise ConfigError("wandb=online needs wandb credentials (run `wandb login` or export WANDB_API_KEY); "
                      "or use --wandb offline and `wandb sync` later")


def _wandb_key_problem(key: str) -> Optional[str]:
    """wandb's own format check of an API key (its sentence), or None; None too where this wandb has no such
    check (the key is then judged by the server, and a refusal is still one line: core.runs.common)."""
    try:
        from wandb.sdk.lib.wbauth.validation import check_api_key
    except ImportError:
        return None
    problem = check_api_key(key)
    return problem.rstrip(".") if problem else None


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Where images come from. root=None means the generated (synthetic, VOC-layout) dataset."""

    section = "data"

    dataset: str = field(default="voc", metadata={"cli_aliases": ("dataset",)})
    """Dataset layout: voc | coco_stuff | imagefolder."""
    root: Optional[str] = None
    """VOC: the folder holding VOCdevkit/ (or VOC2012/); COCO-Stuff: its root; none: the generated dataset."""
    ssl_split: str = "train"
    """VOC images used for self-supervision: train | trainaug | all_but_val (never the val images)."""
    ssl_root: Optional[str] = None
    """An ImageFolder tree used for self-supervision instead of the dataset's own images."""
    image_size: int = field(default=64, metadata={"cli_aliases": ("image-size",)})
    """Side in pixels of the training and evaluation images."""
    num_workers: int = field(default=0, metadata={"cli_aliases": ("num-workers",)})
    """DataLoader worker processes (0: load in the main process)."""
    coco_labels: str = "coarse"
    """COCO-Stuff label space: fine (171 classes) | coarse (27)."""
    corrupt_policy: str = field(default="stop", metadata={"cli_aliases": ("corrupt-policy",)})
    """A corrupt image or mask: stop (the run ends naming it) | skip (skip it and count it in metrics.json)."""
    crop_scale_min: Optional[float] = None
    """Smallest RandomResizedCrop area of the self-supervised views. none: the official 0.08 on real data,
    0.25 on generated data, where an 8% crop of 64 px (~18 px) rarely holds an object that both views share."""
    limit_train: Optional[int] = field(default=None, metadata={"cli_aliases": ("limit-train",)})
    """Use only the first N training images (debugging, smoke runs)."""
    limit_val: Optional[int] = field(default=None, metadata={"cli_aliases": ("limit-val",)})
    """Use only the first N validation images."""
    synthetic_n_train: int = 400
    """Training images of the generated dataset (root none)."""
    synthetic_n_val: int = 200
    """Validation images of the generated dataset."""
    synthetic_seed: int = 0
    """Seed of the generated dataset."""

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
        check_bounds("data.synthetic_seed", self.synthetic_seed, 0, SEED_MAX)

    def ssl_crop_scale(self) -> tuple[float, float]:
        if self.crop_scale_min is not None:
            return (self.crop_scale_min, 1.0)
        return (0.25, 1.0) if self.root is None or self.is_generated_root() else (0.08, 1.0)

    def is_generated_root(self) -> bool:
        """True when `root` holds a dataset written by core.data.synthetic (its marker file)."""
        if self.root is None:
            return True
        from core.data.fingerprint import generator_marker

        return generator_marker(self.root) is not None


# --------------------------------------------------------------------------- shared run settings
@dataclass(frozen=True, kw_only=True)
class RunSettings(ConfigBase):
    """The settings every run stage shares, each declared ONCE here (type, default, doc). A stage config places
    them among its own fields with `shared()` (its --help / config.json order) and gives a field without a
    default here its own with `shared(default=...)`: the ones whose meaning is the same in both stages but
    whose sensible CPU default is not (epochs, batch_size, weight_decay). `lr` is NOT here: stage 1's is a
    base rate scaled by the batch (none: the optimiser's recipe), stage 2's the head's AdamW rate."""

    backbone: str = "vit_nano_patch8"
    """Backbone name (core/models/registry.py)."""
    source: str = "random"
    """Initial backbone weights: random | imagenet | barlowtwins-imagenet | dino | coco-deeplab | checkpoint:PATH."""
    weight_decay: float
    """Weight decay of the optimiser (pretraining: LARS or AdamW; segmentation: AdamW), biases and norms excluded."""
    epochs: int
    """Training epochs."""
    batch_size: int
    """Images per batch per device (the global batch under DDP is devices x batch_size)."""
    precision: str = "32"
    """32 | bf16-mixed | 16-mixed (mixed precision falls back to 32 on the CPU)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    devices: int = 1
    """GPUs for this run (DDP when > 1)."""
    compile: bool = False
    """torch.compile the trained network (pretraining: the backbone; segmentation: the whole model)."""
    seed: int = 0
    """Random seed."""
    diagnostics_every: int = 0
    """Epochs between diagnostic figures (0: only at the end)."""
    wandb: str = field(default="offline", metadata={"bookkeeping": True})
    """offline | online | disabled (a CSV log is always written)."""
    keep_checkpoints: bool = field(default=False, metadata={"bookkeeping": True})
    """Keep checkpoints/last.ckpt once the run has finished (default: deleted on success; the run folder keeps
    its exported weights, metrics, history, figures and config)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data settings."""

    def check_shared(self, *names: str) -> None:
        """Validate the named shared fields (a stage's `validate` calls this where it checks them, so the first
        error of a config with several bad values stays the same)."""
        for name in names:
            value = getattr(self, name)
            if name == "backbone":
                from core.models.registry import check_backbone_name  # late import: the registry is heavy

                check_backbone_name(name, value)
            elif name == "source":
                check_source(name, value)
            elif name == "weight_decay":
                check_bounds(name, value, 0.0, WEIGHT_DECAY_MAX)
            elif name == "epochs":
                check_bounds(name, value, 1, EPOCHS_MAX)
            elif name == "batch_size":
                check_bounds(name, value, 1, BATCH_SIZE_MAX)
            elif name == "seed":
                check_bounds(name, value, 0, SEED_MAX)
            elif name == "devices":
                check_positive(name, value)
            elif name == "diagnostics_every":
                check_positive(name, value, allow_zero=True)
            else:
                check_choice(name, value, {"precision": PRECISIONS, "device": DEVICES, "wandb": WANDB_MODES}[name])


@dataclass(frozen=True)
class _Shared:
    default: Any = dataclasses.MISSING


def shared(default: Any = dataclasses.MISSING) -> Any:
    """In a `stage_config` class body: the RunSettings field of this name goes here (`default`: this stage's
    default, for a field RunSettings declares without one)."""
    return _Shared(default)


def _set_field_order(cls: type, names: Sequence[str]) -> None:
    """Order the dataclass fields of `cls` (dataclasses.fields, asdict -> config.json, the CLI's --help) as
    `names`; a subclass would otherwise list every inherited field first."""
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    if sorted(names) != sorted(fields):
        raise TypeError(f"{cls.__name__}: field order {list(names)} does not match its fields {list(fields)}")
    cls.__dataclass_fields__ = {n: fields[n] for n in names}  # type: ignore[attr-defined]


def stage_config(cls: type) -> type:
    """`@dataclass(frozen=True)` for a stage config deriving from `RunSettings`: every shared field is placed
    with `name = shared()` (or `shared(default=...)`) among the stage's own fields, in the order of the class
    body; a shared field left unplaced, or a placeholder naming no shared field, is a TypeError."""
    base = {f.name: f for f in dataclasses.fields(RunSettings)}
    ann = dict(cls.__dict__.get("__annotations__", {}))
    order: list[str] = []
    for name, value in list(cls.__dict__.items()):
        if isinstance(value, _Shared):
            f = base.get(name)
            if f is None:
                raise TypeError(f"{cls.__name__}.{name} = shared(): RunSettings has no field {name!r}")
            delattr(cls, name)
            if value.default is not dataclasses.MISSING:
                ann[name] = f.type
                setattr(cls, name, field(default=value.default, metadata=f.metadata))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{name}: RunSettings declares no default; use shared(default=...)")
            order.append(name)
        elif name in ann:
            order.append(name)
    order += [n for n in ann if n not in order]  # own fields without a default
    unplaced = [n for n in base if n not in order]
    if unplaced:
        raise TypeError(f"{cls.__name__}: place the shared field(s) {', '.join(unplaced)} with name = shared()")
    cls.__annotations__ = ann
    cls = dataclass(frozen=True)(cls)
    _set_field_order(cls, order)
    return cls


# --------------------------------------------------------------------------- stage 1
@stage_config
class PretrainSettings(RunSettings):
    """Stage 1, the settings every self-supervised method shares. `PretrainConfig` adds one section per
    method (its options); use `PretrainConfig`."""

    method: str = "barlow_twins"
    """Self-supervised method (core/methods/registry.py): barlow_twins | dino | ..."""
    backbone = shared()
    source = shared()
    projector: tuple[int, ...] = (512, 512)
    """Projector (expander) widths, e.g. 8192-8192-8192 (the official Barlow Twins size); DINO's head hidden width is
    their maximum (capped at 2048)."""
    optimizer: str = "adamw"
    """lars | adamw."""
    lr: Optional[float] = field(default=2e-3, metadata={"cli_none_words": ("recipe",)})
    """Base learning rate; none (or recipe): the optimiser's official recipe scaled by batch/256 (LARS 0.2 weights /
    0.0048 biases, AdamW 5e-4). The default 2e-3 (AdamW, batch 32) is the CPU setting for the generated data; a
    method's registry entry may start from its own value (`SSLMethodSpec.defaults`: DINO 5e-4)."""
    min_lr: Optional[float] = None
    """Learning rate at the end of the cosine decay, the same for every parameter group (official DINO 1e-6);
    none: 0.001 x each group's base lr (official Barlow Twins)."""
    weight_decay = shared(default=1.5e-6)
    weight_decay_end: Optional[float] = None
    """Final weight decay: a per-step cosine from weight_decay to this over training, on the decayed (weights)
    group only (official DINO 0.04 -> 0.4); none: constant weight decay."""
    drop_path: float = 0.0
    """Stochastic depth rate of the trained backbone (timm ViT / Swin only; DINO: the student, never the teacher;
    official DINO ViT-S 0.1)."""
    epochs = shared(default=20)
    warmup_epochs: float = 1.0
    """Linear learning-rate warmup before the cosine decay, in epochs (per-step schedule)."""
    batch_size = shared(default=32)
    precision = shared()
    device = shared()
    devices = shared()
    compile = shared()
    gpu_augment: bool = True
    """Colour / blur / solarize on whole batches on the GPU (the CPU pipeline does them per image otherwise)."""
    seed = shared()
    knn_k: int = 20
    """Neighbours of the k-NN monitor."""
    dense_probe_steps: int = 50
    """L-BFGS iterations of the frozen dense linear probe run before and after pretraining
    (core/metrics/dense_probe.py; metrics.json dense_probe_miou); 0: no probe (null)."""
    attn_eval_size: Optional[int] = 480
    """Side in pixels of the square the val images and masks are resized to for the attention-mask Jaccard
    (core/metrics/attention_jaccard.py; DINO visualize_attention.py's default image_size (480, 480)); none: the
    training image size (data.image_size), the k-NN images as they are. Data generated by core/data/synthetic.py
    is always scored as it is: upscaling its small squares adds nothing and costs ~35x the CPU time."""
    diagnostics_every = shared()
    wandb = shared()
    keep_checkpoints = shared()
    data = shared()

    def validate(self) -> None:
        from core.methods.registry import ssl_methods
        from core.models.registry import check_drop_path  # late import: registry is heavy

        check_choice("method", self.method, tuple(ssl_methods()))
        self.check_shared("backbone", "source")
        if not self.projector:
            raise ConfigError("projector=() must list at least one layer width, e.g. 8192-8192-8192")
        for w in self.projector:
            check_positive("projector (layer width)", w)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None:
            check_bounds("lr", self.lr, 0.0, LR_MAX, lo_open=True)
        self.check_shared("weight_decay")
        if self.weight_decay_end is not None:
            check_bounds("weight_decay_end", self.weight_decay_end, 0.0, WEIGHT_DECAY_MAX)
        check_drop_path("drop_path", self.drop_path, self.backbone)
        self.check_shared("epochs")
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 2 (the SSL losses normalise over the batch)")
        self.check_shared("batch_size")
        if self.min_lr is not None:
            from core.methods.optim import recipe_lrs

            check_positive("min_lr", self.min_lr, allow_zero=True)
            base = min(recipe_lrs(self.optimizer, self.lr, self.batch_size * max(self.devices, 1)))
            if self.min_lr > base:
                raise ConfigError(
                    f"min_lr={self.min_lr!r} must be <= the smallest base learning rate {base:.3g} (optimizer="
                    f"{self.optimizer}, lr={self.lr}, global batch {self.batch_size * max(self.devices, 1)})"
                )
        self.check_shared("precision", "device", "devices")
        check_positive("knn_k", self.knn_k)
        check_positive("dense_probe_steps", self.dense_probe_steps, allow_zero=True)
        if self.attn_eval_size is not None:
            check_range("attn_eval_size", self.attn_eval_size, 16, 4096)
        self.check_shared("diagnostics_every", "wandb", "seed")

    @property
    def options(self) -> Any:
        """The selected method's own section (`cfg.<method>`)."""
        return getattr(self, self.method)

    @classmethod
    def from_dict(cls, d: Optional[dict] = None, **overrides: Any):
        """As `ConfigBase.from_dict`, starting from the selected method's `SSLMethodSpec.defaults` (its own
        values of shared settings, e.g. a learning rate) for every field not given in `d` / `overrides`."""
        from core.methods.registry import ssl_methods

        d = dict(d or {})
        d.update({k: v for k, v in overrides.items() if v is not None})
        spec = ssl_methods().get(d.get("method", cls.method))  # an unknown method: validation says so
        for k, v in (spec.defaults.items() if spec is not None else ()):
            d.setdefault(k, v)
        return super().from_dict(d)


def _pretrain_config() -> type:
    """`PretrainSettings` + one section field per registered SSL method."""
    from core.methods.registry import ssl_methods

    sections = [(name, spec.options, field(default_factory=spec.options,
                                           metadata={"help": f"{spec.label} options ({spec.paper})."}))
                for name, spec in ssl_methods().items()]
    cls = dataclasses.make_dataclass("PretrainConfig", sections, bases=(PretrainSettings,), frozen=True)
    _set_field_order(cls, [f.name for f in dataclasses.fields(PretrainSettings)] + [n for n, _, _ in sections])
    cls.__module__ = __name__
    cls.__doc__ = "Stage 1: self-supervised pretraining; one section per SSL method (`cfg.barlow_twins`, ...)."
    return cls


def __getattr__(name: str) -> Any:
    # PretrainConfig is built on first use, once every method module can import this one.
    if name == "PretrainConfig":
        cls = _pretrain_config()
        globals()["PretrainConfig"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- stage 2
@stage_config
class SegmentConfig(RunSettings):
    """Stage 2: semantic segmentation on top of a (pretrained) backbone."""

    evaluation: Optional[str] = None
    """Preset E1..E5 (core/evaluations.py); fields set explicitly override it."""
    backbone = shared()
    head: str = "setr_pup"
    """linear | setr_naive | setr_pup | setr_mla | deeplabv3 | segformer."""
    head_channels: Optional[int] = None
    """Width (channels) of the segmentation head's convolutions: SETR naive / PUP / MLA (and the SETR-PUP auxiliary
    heads), SegFormer's embedding; none: the head's reference width (mmseg: 256). Refused for heads without one
    (linear, deeplabv3: torchvision's fixed 256)."""
    aux_heads: bool = False
    """SETR-PUP deep supervision as mmseg trains it: auxiliary SETR-UP heads on intermediate transformer blocks
    (41.7/62.5/83.3% of the depth: blocks 9, 14, 19 of 24), each CE x 0.4 added to the loss; training only, the
    predictions use the main head. head=setr_pup on a transformer backbone only (core/models/heads/setr.py)."""
    head_input_norm: bool = False
    """SETR-PUP's input as mmseg builds it: the head normalises the last block's raw output with its own LayerNorm
    (SETRUPHead.norm) and the backbone's final norm is frozen, unused (mmseg final_norm=False); false: the head reads
    the backbone's final-normed tokens. head=setr_pup only (core/models/heads/setr.py)."""
    fusion: str = "none"
    """Attention fusion: none | features (fusion 1) | affinity (fusion 2); transformers only."""
    fusion_blocks: int = 1
    """Fusion 1: use the CLS attention of the last K blocks."""
    fusion_steps: int = 2
    """Fusion 2: propagation steps t of L <- (1 - a) L + a A L."""
    fusion_alpha: float = 0.1
    """Fusion 2: initial mixing weight a (learnt). Near 0 the head starts as the plain head and training
    opens the gate only if the attention helps (docs/findings.md)."""
    fusion_alpha_lr: float = 0.05
    """Fusion 2: learning rate of a's logit; a scalar gate needs larger steps than the weights to move in a
    short fine-tune."""
    source = shared()
    mode: str = "finetune"
    """frozen (head only) | finetune (backbone too, at lr x backbone_lr_scale)."""
    loss: str = "ce"
    """ce | dice | focal (255 ignored)."""
    epochs = shared(default=8)
    lr: float = 1e-3
    """Learning rate of the head (AdamW)."""
    backbone_lr_scale: float = 0.1
    """Fine-tuning: the backbone's lr is lr x this."""
    weight_decay = shared(default=1e-4)
    batch_size = shared(default=16)
    precision = shared()
    device = shared()
    devices = shared()
    compile = shared()
    train_pipeline: str = "simple"
    """Training augmentation: simple (random resized crop at data.image_size, scale 0.25-1, flip) | mmseg (mmseg's VOC
    pipeline: RandomResize ratio 0.5-2.0 of train_scale, RandomCrop crop_size with cat_max_ratio, flip,
    PhotoMetricDistortion, padded to the crop with 255 on the mask)."""
    crop_size: Optional[int] = None
    """mmseg pipeline: side of the square training crop in pixels (mmseg VOC: 512); none: data.image_size."""
    train_scale: Optional[int] = None
    """mmseg pipeline: RandomResize base short side in pixels (scaled by a ratio in 0.5-2.0, long side capped at 4x;
    mmseg VOC: 512 of scale=(2048, 512)); none: eval_scale, or data.image_size."""
    cat_max_ratio: float = 0.75
    """mmseg pipeline: the random crop is redrawn (up to 10 times) while one class covers more than this fraction of
    its labelled pixels (255 ignored); 1 disables."""
    train_split: str = "train"
    """Training images: train (VOC seg train, 1,464 images) | trainaug (SBD SegmentationClassAug with
    ImageSets/Segmentation/trainaug.txt, 10,582 images, val ids excluded; VOC only)."""
    schedule: str = "cosine"
    """Learning-rate schedule, per optimizer step: cosine (linear warmup over 5% of the steps, then cosine) | poly
    (mmseg PolyLR: power 0.9 by iteration from lr down to lr x min_lr_ratio, no warmup)."""
    min_lr_ratio: float = 0.01
    """poly schedule: each parameter group ends at its base lr x this (mmseg schedule_20k: eta_min 1e-4 at lr
    0.01)."""
    max_iters: Optional[int] = None
    """Iteration-based training: optimizer steps in all, epochs ignored (mmseg VOC: 20000 or 40000); none: epochs."""
    eval_scale: Optional[int] = None
    """Validation: each val image is resized keeping its aspect ratio to this short side in pixels (long side
    capped at eval_max_long), predicted, and its logits resized back to the ORIGINAL mask's H x W for scoring
    (mmseg's VOC test pipeline; paper scale 512); none: data.image_size."""
    eval_max_long: Optional[int] = None
    """Validation: cap on the long side after the evaluation resize (the short side then stays below
    eval_scale); none: 4 x the short side (mmseg's scale=(2048, 512))."""
    inference: str = "whole"
    """Validation inference on the resized image: whole (padded to the patch multiple) | slide (sliding windows)."""
    slide_crop: Optional[int] = None
    """Sliding-window side in pixels; none: the evaluation short side (eval_scale or data.image_size) rounded down
    to the backbone's patch multiple (mmseg: crop 512 at scale 512)."""
    slide_stride: Optional[int] = None
    """Sliding-window stride in pixels (<= slide_crop); none: 2/3 of the crop (mmseg: 341 for 512)."""
    seed = shared()
    diagnostics_every = shared()
    wandb = shared()
    keep_checkpoints = shared()
    data = shared()

    def validate(self) -> None:
        from core.evaluations import EVALUATIONS
        from core.models.heads import check_head_channels, check_head_name

        if self.evaluation is not None:
            check_choice("evaluation", self.evaluation, tuple(EVALUATIONS))
        self.check_shared("backbone")
        check_head_name("head", self.head)
        check_head_channels("head_channels", self.head, self.head_channels)
        if not isinstance(self.aux_heads, bool):
            raise ConfigError(f"aux_heads={self.aux_heads!r} must be true or false")
        if self.aux_heads and self.head != "setr_pup":
            raise ConfigError(f"aux_heads=true is SETR-PUP's deep supervision and needs head=setr_pup, not "
                              f"head={self.head!r}; set aux_heads=false or head=setr_pup")
        if not isinstance(self.head_input_norm, bool):
            raise ConfigError(f"head_input_norm={self.head_input_norm!r} must be true or false")
        if self.head_input_norm and self.head != "setr_pup":
            raise ConfigError(f"head_input_norm=true is SETR-PUP's input LayerNorm and needs head=setr_pup, not "
                              f"head={self.head!r}; set head_input_norm=false or head=setr_pup")
        check_choice("fusion", self.fusion, FUSIONS)
        check_positive("fusion_blocks", self.fusion_blocks)
        check_positive("fusion_steps", self.fusion_steps)
        check_range("fusion_alpha", self.fusion_alpha, 0.0, 1.0)
        check_positive("fusion_alpha_lr", self.fusion_alpha_lr, allow_zero=True)
        self.check_shared("source")
        check_choice("mode", self.mode, SEG_MODES)
        check_choice("loss", self.loss, SEG_LOSSES)
        self.check_shared("epochs")
        check_bounds("lr", self.lr, 0.0, LR_MAX, lo_open=True)
        check_positive("backbone_lr_scale", self.backbone_lr_scale, allow_zero=True)
        self.check_shared("weight_decay", "batch_size", "precision", "device", "devices")
        check_choice("train_pipeline", self.train_pipeline, SEG_TRAIN_PIPELINES)
        if self.crop_size is not None:
            check_range("crop_size", self.crop_size, 16, 4096)
        if self.train_scale is not None:
            check_range("train_scale", self.train_scale, 16, 4096)
        if self.train_pipeline != "mmseg":
            for name in ("crop_size", "train_scale"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}={getattr(self, name)} applies to train_pipeline=mmseg only; "
                                      f"set train_pipeline=mmseg or leave {name} unset")
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ConfigError(f"cat_max_ratio={self.cat_max_ratio!r} must be > 0 and <= 1 (1 disables the check)")
        check_choice("train_split", self.train_split, SEG_TRAIN_SPLITS)
        if self.train_split == "trainaug" and self.data.dataset != "voc":
            raise ConfigError(f"train_split=trainaug needs data.dataset=voc (SBD SegmentationClassAug), not "
                              f"{self.data.dataset}; use train_split=train")
        check_choice("schedule", self.schedule, SEG_SCHEDULES)
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio!r} must be >= 0 and < 1")
        if self.max_iters is not None:
            check_bounds("max_iters", self.max_iters, 1, MAX_ITERS_MAX)
        if self.eval_scale is not None:
            check_range("eval_scale", self.eval_scale, 16, 4096)
        if self.eval_max_long is not None:
            check_range("eval_max_long", self.eval_max_long, 16, 16384)
            if self.eval_max_long < self.eval_short_side():
                raise ConfigError(f"eval_max_long={self.eval_max_long} must be >= the evaluation short side "
                                  f"{self.eval_short_side()} (eval_scale, or data.image_size when none)")
        check_choice("inference", self.inference, INFERENCE)
        if self.slide_crop is not None:
            check_positive("slide_crop", self.slide_crop)
        if self.slide_stride is not None:
            check_positive("slide_stride", self.slide_stride)
            if self.slide_crop is not None and self.slide_stride > self.slide_crop:
                raise ConfigError(
                    f"slide_stride={self.slide_stride} must be <= slide_crop={self.slide_crop} (windows must overlap or touch)"
                )
            if self.slide_crop is None and self.slide_stride > self.eval_short_side():
                raise ConfigError(
                    f"slide_stride={self.slide_stride} must be <= the sliding-window crop {self.eval_short_side()} "
                    f"(slide_crop none: the evaluation short side); lower slide_stride or set slide_crop"
                )
        self.check_shared("diagnostics_every", "wandb", "seed")

    def eval_short_side(self) -> int:
        """The evaluation short side in pixels: eval_scale, or data.image_size when none."""
        return int(self.eval_scale if self.eval_scale is not None else self.data.image_size)

    def eval_long_cap(self) -> int:
        """The cap on the long side after the evaluation resize: eval_max_long, or 4 x the short side."""
        return int(self.eval_max_long if self.eval_max_long is not None else 4 * self.eval_short_side())
