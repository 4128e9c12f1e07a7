"""Throughput benchmark: images/s and peak memory of ONE training step (forward + backward + optimiser).

    python experiments/bench.py                                   # CPU-sized default, < 2 min on 2 cores
    python experiments/bench.py --backbone resnet50 vit_small_patch16 --image-size 224 \\
        --batch-size 256 --precision bf16 --projector 8192-8192-8192 --json bench.json --markdown

    python experiments/bench.py --suite gpu                      # the fixed GPU check, <= 8 min on one H100/H200
    python experiments/bench.py --suite loader --recipes bt,dino  # loader img/s per worker (bench_loader.py)

``--suite gpu`` (`suite_plan`, `run_suite`): Barlow Twins ResNet-50 (channels_last) and ViT-S/16 at 224 px,
batch 256, bf16, projector 8192-8192-8192, each with a synthetic-batch row (``model``) and a real-pipeline row
(``pipeline``: DataLoader with workers over generated JPEGs of VOC's size), DINO ViT-S/16 (2 x 224 + 6 x 96
crops), the E1 (DeepLabV3 on the dilated ResNet-50) and E2 (SETR-PUP / linear on ViT-S/16) steps at 512 px,
the E2 step fed by paper.yaml's mmseg loader (``--seg-pipeline mmseg``: worker regions, crops made on the
device), and with 2 GPUs a 2-process DDP Barlow Twins check (`ddp_check`); it replaces its table in BENCHMARKS.md
(machine, date, command; `update_benchmarks`). Without a GPU the same rows run tiny on the CPU (resnet_tiny /
vit_nano_patch8, 64 px, one step, DDP on gloo) and go to a separate ``cpu-fallback`` block.
Every row, in every suite, carries ``GFLOP/img`` (forward + backward FLOPs of one image with all its views,
counted with torch's FlopCounterMode on the real step over 2 images, core/flops.py) and ``MFU`` (GFLOP/img x
img/s / the GPU's dense bf16 peak, core/flops.py ``PEAK_BF16_TFLOPS``; '-' on the CPU or an unknown GPU).

Tasks (``--tasks``), all driven through the project's own LightningModules, step by step exactly as
Lightning's automatic optimisation does it (training_step under autocast -> backward ->
on_before_optimizer_step -> optimizer.step -> zero_grad -> scheduler.step -> on_train_batch_end):

- ``barlow_twins``: `BarlowTwinsMethod` (backbone + BarlowTwinsProjector + core BarlowTwinsLoss, LARS);
- ``dino``: `DINOMethod` (student + EMA teacher + DINOHead + DINOLoss, 2 global + N local crops, AdamW,
  per-parameter gradient clipping);
- ``segment``: `SegmentationMethod` (Segmenter = backbone + head, cross-entropy, AdamW).

Side by side with ``barlow_twins`` (unless ``--no-lightly``): lightly's Barlow Twins
(`lightly.models.modules.BarlowTwinsProjectionHead` + `lightly.loss.BarlowTwinsLoss`) on the SAME
backbone architecture, projector widths, batch, optimiser (LARS) and input; the two are timed in
interleaved blocks (so machine drift hits both) and the ratio twinseg/lightly img/s is printed. The two
losses are also evaluated on the same embeddings (they are definitionally identical: both normalise each
dimension over the batch with the biased variance and eps=1e-5, C = z1n^T z2n / N, same lambda).

Modes (``--mode``):
- ``model``: synthetic tensors already on the device (the model's speed only);
- ``pipeline``: the real DataLoader over the generated VOC-layout data (or ``--data-root``) with the
  real transforms, pinned memory, non_blocking copies, persistent workers and, on CUDA, the colour
  part of the recipe as GPU batch augmentation. ``data wait`` is the share of the step time spent
  waiting for the loader: when pipeline img/s << model img/s, loading is the bottleneck.

Timing: ``--warmup`` steps, then ``--repeats`` blocks of ``--iters`` steps (torch.cuda.synchronize at
block edges on GPU); img/s = batch / median step time. Peak memory: torch.cuda.max_memory_allocated
over the timed steps on GPU; on CPU the peak resident set size of the process sampled every 5 ms
during the timed steps (process-wide: includes the interpreter, libraries and the model).
Attention weights are never requested in the timed step (timm's fused attention runs).
A bad flag ends in one ``twinseg: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import guard  # noqa: E402
from core.errors import ConfigError  # noqa: E402

TASKS = ("barlow_twins", "dino", "segment")
SUITES = ("gpu", "loader")
MODES = ("model", "pipeline")
PRECISIONS = ("32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BACKBONES = ("vit_nano_patch8", "resnet_tiny")
LAMBD = 0.0051
NUM_CLASSES = 21



class _LazyModule:
    """`torch` / `torch.nn` imported on first use, so that a bad flag is reported without paying the
    torch import (the first attribute access swaps the real module into this module's globals)."""

    def __init__(self, module: str, alias: str):
        self._module, self._alias = module, alias

    def __getattr__(self, attr: str):
        import importlib

        mod = importlib.import_module(self._module)
        globals()[self._alias] = mod
        return getattr(mod, attr)


torch: Any = _LazyModule("torch", "torch")
nn: Any = _LazyModule("torch.nn", "nn")


# --------------------------------------------------------------------------- settings / results
@dataclass(frozen=True)
class BenchSettings:
    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    tasks: tuple[str, ...] = TASKS
    modes: tuple[str, ...] = MODES
    image_size: int = 64
    batch_size: int = 16
    precision: str = "32"
    device: str = "auto"
    channels_last: bool = True  # CNNs only (the training methods always use it; --no-channels-last for A/B)
    compile: bool = False
    warmup: int = 2
    iters: int = 2
    repeats: int = 3
    workers: int = 2
    projector: tuple[int, ...] = (512, 512, 512)
    dino_out_dim: int = 1024
    dino_local_crops: int = 2
    seg_head: str = "auto"
    seg_pipeline: str = "simple"  # segmentation train pipeline of the `pipeline` mode: simple | mmseg (paper.yaml)
    lightly: bool = True
    data_root: Optional[str] = None
    seed: int = 0
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, one per core)

    def validate(self) -> None:
        """Cheap checks first (no heavy import), then names against the registries."""
        self.validate_numbers()
        from core.models.heads import check_head_name
        from core.models.registry import check_backbone_name

        for b in self.backbones:
            check_backbone_name("--backbone", b)
        if self.seg_head != "auto":
            check_head_name("--seg-head", self.seg_head)
        from core.data.transforms import SEG_TRAIN_PIPELINES

        if self.seg_pipeline not in SEG_TRAIN_PIPELINES:
            raise ConfigError(f"--seg-pipeline {self.seg_pipeline!r} is not known; choose from: "
                              f"{', '.join(SEG_TRAIN_PIPELINES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible; use --device auto or cpu")

    def validate_numbers(self) -> None:
        if not self.backbones:
            raise ConfigError("--backbone needs at least one backbone name, e.g. --backbone resnet_tiny")
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"--tasks {t!r} is not known; choose from: {', '.join(TASKS)}")
        for m in self.modes:
            if m not in MODES:
                raise ConfigError(f"--mode {m!r} is not known; choose from: model, pipeline, both")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not allowed; choose 32 or bf16")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r} is not allowed; choose auto, cpu or cuda")
        if not 16 <= self.image_size <= 4096:
            raise ConfigError(f"--image-size {self.image_size} must be between 16 and 4096")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size {self.batch_size} must be >= 2 (Barlow Twins and BatchNorm "
                              f"normalise over the batch)")
        for name, v, lo in (("--warmup", self.warmup, 0), ("--iters", self.iters, 1), ("--repeats", self.repeats, 1),
                            ("--workers", self.workers, 0), ("--dino-out-dim", self.dino_out_dim, 1),
                            ("--dino-local-crops", self.dino_local_crops, 0),
                            ("--threads", 1 if self.threads is None else self.threads, 1)):
            if v < lo:
                raise ConfigError(f"{name} {v} must be >= {lo}")
        if not self.projector or any(w <= 0 for w in self.projector):
            raise ConfigError(f"--projector {'-'.join(map(str, self.projector))} must list positive widths, "
                              f"e.g. 8192-8192-8192")
        if self.lightly and "barlow_twins" in self.tasks and (len(self.projector) != 3
                                                              or self.projector[0] != self.projector[1]):
            raise ConfigError(
                f"--projector {'-'.join(map(str, self.projector))}: lightly's BarlowTwinsProjectionHead has "
                f"exactly 3 layers (hidden, hidden, out); use e.g. 2048-2048-2048 or pass --no-lightly"
            )
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise ConfigError(f"--data-root {self.data_root} is not a folder; point it at a folder holding "
                              f"VOCdevkit/VOC2012 or leave it out to use the generated dataset")


@dataclass
class BenchRow:
    task: str
    impl: str  # twinseg | lightly
    mode: str  # model | pipeline
    backbone: str
    image_size: int
    batch_size: int
    precision: str
    device: str
    channels_last: bool
    compile: bool
    img_per_s: float  # batch / median step time
    step_ms: float  # median over the timed blocks of the mean step time in a block
    best_step_ms: float  # fastest block (least disturbed by other load on the machine)
    cpu_ms: float  # CPU time (user + sys, all threads of this process) per step; loader workers excluded
    peak_mem_mb: float
    mem_kind: str  # cuda_max_allocated | cpu_peak_rss
    data_wait_frac: Optional[float]
    loss: float
    iters: int
    repeats: int
    detail: str = ""
    flops_per_image: Optional[float] = None  # forward + backward FLOPs of one image, all views (core/flops.py)
    mfu: Optional[float] = None  # flops_per_image x img/s / dense bf16 peak; None on CPU / unknown GPU
    suite_item: str = ""  # the --suite gpu row label (empty outside a suite)
    machine: str = ""
    torch: str = ""
    command: str = ""
    date: str = ""


@dataclass
class BenchReport:
    machine: str
    torch: str
    command: str
    date: str
    settings: dict
    rows: list[BenchRow] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
    loss_checks: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


# --------------------------------------------------------------------------- machine info
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def ram_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (+ {os.cpu_count()} CPU cores)"
    ram = ram_gib()
    ram_s = f", {ram:.0f} GiB RAM" if ram else ""
    return f"{cpu_model()} x{os.cpu_count()} cores, {torch.get_num_threads()} torch threads{ram_s}"


def resolve_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# --------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Peak memory over a `with` block: CUDA max allocated, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2 ** 20)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())


def _cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- runners
def to_device(batch: Any, device: torch.device) -> Any:
    """Like Lightning's batch transfer: every tensor `.to(device, non_blocking=True)` (pinned on CUDA)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class Runner:
    """One thing to time: `next_batch()` (data, timed as 'wait') then `step(batch)` (train step)."""

    task = ""
    impl = "twinseg"

    def __init__(self, mode: str, device: torch.device, batch_size: int, backbone: str, detail: str = ""):
        self.mode, self.device, self.batch_size, self.backbone, self.detail = mode, device, batch_size, backbone, detail
        self._synthetic: Any = None
        self._loader = None
        self._it: Optional[Iterator] = None
        self.step_index = 0

    # data
    def set_synthetic(self, batch: Any) -> None:
        self._synthetic = to_device(batch, self.device)

    def set_loader(self, loader) -> None:
        self._loader = loader

    def next_batch(self) -> Any:
        if self._loader is None:
            return self._synthetic
        try:
            b = next(self._it) if self._it is not None else None
        except StopIteration:
            b = None
        if b is None:  # new epoch (persistent workers: cheap)
            self._it = iter(self._loader)
            b = next(self._it)
        return to_device(b, self.device)

    def step(self, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_image(self, batch: Any) -> Optional[int]:
        """Forward + backward FLOPs of one image of `batch` (all its views), FlopCounterMode on 2 images."""
        return None

    def close(self) -> None:
        """Stop the loader's (persistent) workers now, so they cannot compete with the next measurement."""
        for it in (self._it, getattr(self._loader, "_iterator", None)):
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
        self._it = None
        self._loader = None


def first_images(batch: Any, n: int) -> Any:
    """`batch` cut to its first `n` images (every tensor's leading dim; the mmseg loader's packed regions by
    `MMSegTrainTransform.first`)."""
    if isinstance(batch, dict) and "region_image" in batch:
        from core.data.transforms import MMSegTrainTransform

        return MMSegTrainTransform.first(batch, n)
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (list, tuple)):
        return type(batch)(first_images(b, n) for b in batch)
    if isinstance(batch, dict):
        return {k: first_images(v, n) for k, v in batch.items()}
    return batch


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LightningStepRunner(Runner):
    """Drives a project LightningModule one optimisation step at a time, as Lightning's automatic
    optimisation does (no Trainer: `self.log` is a no-op, which is cheaper than the real logger)."""

    def __init__(self, module, precision: str, **kw):
        super().__init__(**kw)
        self.module = module.to(self.device)
        self.module.train()
        conf = self.module.configure_optimizers()
        self.opt = conf["optimizer"]
        self.sched = conf["lr_scheduler"]["scheduler"]
        self.precision = precision

    def step(self, batch):
        i = self.step_index
        with _autocast(self.device, self.precision):
            loss = self.module.training_step(batch, i)
        loss.backward()
        self.module.on_before_optimizer_step(self.opt)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.module.on_train_batch_end(loss, batch, i)
        self.step_index += 1
        return loss.detach()

    def flops_per_image(self, batch):
        from core.flops import training_flops_per_image

        return training_flops_per_image(self.module, first_images(batch, 2), 2)


class LightlyBarlowTwinsRunner(Runner):
    """lightly's Barlow Twins on the same backbone/widths/batch/optimiser as `BarlowTwinsMethod`."""

    impl = "lightly"
    task = "barlow_twins"

    def __init__(self, net: nn.Module, projector: Sequence[int], precision: str, channels_last: bool,
                 compile_: bool, gpu_augment: Optional[Sequence] = None, **kw):
        from lightly.loss import BarlowTwinsLoss as LightlyLoss
        from lightly.models.modules import BarlowTwinsProjectionHead

        from core.methods.optim import build_optimizer, warmup_cosine

        super().__init__(**kw)
        self.net = net
        self.channels_last = channels_last and not net.is_transformer
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.head = BarlowTwinsProjectionHead(net.embed_dim, int(projector[0]), int(projector[-1]))
        self.model = nn.ModuleDict({"backbone": self.net, "head": self.head}).to(self.device).train()
        self.encoder = torch.compile(self.net) if compile_ else self.net
        self.criterion = LightlyLoss(lambda_param=LAMBD)
        self.opt = build_optimizer(self.model, "lars", None, 1.5e-6, self.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine(s, 1000, 10))
        self.precision = precision
        self.gpu_aug = tuple(gpu_augment) if gpu_augment else ()

    def _prep(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.gpu_aug:
            with torch.no_grad():
                x = self.gpu_aug[min(i, len(self.gpu_aug) - 1)](x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss(self, batch, autocast: bool = True):
        views = batch[0] if isinstance(batch[0], (list, tuple)) else batch
        x1, x2 = self._prep(views[0], 0), self._prep(views[1], 1)
        with _autocast(self.device, self.precision if autocast else "32"):
            z1 = self.head(self.encoder(x1))
            z2 = self.head(self.encoder(x2))
            return self.criterion(z1, z2)

    def flops_per_image(self, batch):
        from core.flops import count_flops

        saved = self.gpu_aug
        self.gpu_aug = ()  # data augmentation is not model FLOPs
        try:
            n = count_flops(lambda: self._loss(first_images(batch, 2), autocast=False).backward())
        finally:
            self.gpu_aug = saved
            self.opt.zero_grad(set_to_none=True)
        return n // 2

    def step(self, batch):
        loss = self._loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_index += 1
        return loss.detach()


# --------------------------------------------------------------------------- builders
def seg_head_for(backbone, name: str) -> str:
    if name != "auto":
        return name
    return "setr_pup" if backbone.is_transformer else "deeplabv3"


def dino_local_size(s: BenchSettings, backbone) -> int:
    from core.data.transforms import default_local_size

    return default_local_size(s.image_size)


def check_backbone_settings(s: BenchSettings) -> None:
    """Every backbone can be built and takes the image size (and DINO's local crop size)."""
    from core.models.registry import create_backbone

    for name in s.backbones:
        bb = create_backbone(name, image_size=s.image_size)
        bb.check_input_size(s.image_size, s.image_size)
        if "dino" in s.tasks and s.dino_local_crops > 0:
            loc = dino_local_size(s, bb)
            try:
                bb.check_input_size(loc, loc)
            except ConfigError as e:
                raise ConfigError(f"DINO local crops of {loc} px do not fit {name}: {e}; use another --image-size "
                                  f"or --dino-local-crops 0") from None
        if "segment" in s.tasks:
            from core.models.heads import create_head

            create_head(seg_head_for(bb, s.seg_head), bb, NUM_CLASSES)
        del bb


def data_config(s: BenchSettings):
    from core.config import DataConfig

    n_train = max(96, 2 * s.batch_size)
    return DataConfig(root=s.data_root, image_size=s.image_size, num_workers=s.workers,
                      synthetic_n_train=n_train, synthetic_n_val=16)


def pretrain_config(s: BenchSettings, method: str, backbone: str):
    """The method's PretrainConfig; its `data` section is the bench's (`data_config`), so the views the
    registry builds from it (`spec.views(cfg, ...)`) use the same image size and crop scale as the loaders."""
    from core.config import PretrainConfig

    extra = {"optimizer": "adamw", "weight_decay": 0.04} if method == "dino" else {}
    return PretrainConfig(method=method, backbone=backbone, projector=tuple(s.projector),
                          barlow_twins={"lambd": LAMBD},
                          dino={"out_dim": s.dino_out_dim, "local_crops": s.dino_local_crops},
                          batch_size=s.batch_size, epochs=10, warmup_epochs=1, compile=s.compile,
                          gpu_augment=False, seed=s.seed, data=data_config(s), **extra)


def _new_backbone(s: BenchSettings, name: str, **options):
    from core.models.registry import create_backbone

    torch.manual_seed(s.seed)
    return create_backbone(name, image_size=s.image_size, **options)


def _apply_channels_last_choice(module, backbone, s: BenchSettings) -> None:
    """The methods put CNNs in channels_last; with --no-channels-last undo it (A/B comparisons)."""
    if not s.channels_last and not backbone.is_transformer:
        module.channels_last = False
        backbone.to(memory_format=torch.contiguous_format)


def ssl_loaders(s: BenchSettings, cfg, device: torch.device):
    """The real SSL loaders of `cfg.method`: its registry entry builds the views (on CUDA with the colour
    part of the recipe left to GPU batch augmentation, `.batch_augment`)."""
    from core.data.module import build_ssl_loaders
    from core.methods.registry import get_method

    views = get_method(cfg.method).views(cfg, device.type == "cuda")
    return build_ssl_loaders(cfg.data, views, s.batch_size, seed=s.seed)


def build_ssl_method(cfg, gpu_augment, backbone):
    """The method's LightningModule, from the registry (`core.methods.registry`)."""
    from core.methods.registry import get_method

    return get_method(cfg.method).module(cfg, gpu_augment=gpu_augment, backbone=backbone)


def synthetic_views(s: BenchSettings, sizes: Sequence[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(s.seed)
    return [torch.randn(s.batch_size, 3, z, z, generator=g) for z in sizes]


def build_bt_runners(s: BenchSettings, name: str, mode: str, device: torch.device) -> list[Runner]:
    cfg = pretrain_config(s, "barlow_twins", name)
    loaders = ssl_loaders(s, cfg, device) if mode == "pipeline" else None
    aug = loaders.batch_augment if loaders is not None else None
    bb = _new_backbone(s, name)
    method = build_ssl_method(cfg, aug, bb)
    _apply_channels_last_choice(method, bb, s)
    proj = "-".join(map(str, s.projector))
    tw = LightningStepRunner(method, s.precision, mode=mode, device=device, batch_size=s.batch_size, backbone=name,
                             detail=f"projector {proj}, LARS")
    tw.task = "barlow_twins"
    runners: list[Runner] = [tw]
    if s.lightly:
        lt = LightlyBarlowTwinsRunner(_new_backbone(s, name), s.projector, s.precision, s.channels_last, s.compile,
                                      gpu_augment=aug, mode=mode, device=device, batch_size=s.batch_size,
                                      backbone=name, detail=f"lightly head {proj}, LARS")
        runners.append(lt)
    for r in runners:
        if loaders is not None:
            r.set_loader(loaders.train)
        else:
            r.set_synthetic(synthetic_views(s, (s.image_size, s.image_size)))
    return runners


def build_dino_runner(s: BenchSettings, name: str, mode: str, device: torch.device) -> Runner:
    cfg = pretrain_config(s, "dino", name)
    loaders = ssl_loaders(s, cfg, device) if mode == "pipeline" else None
    aug = loaders.batch_augment if loaders is not None else None
    bb = _new_backbone(s, name)
    method = build_ssl_method(cfg, aug, bb)
    _apply_channels_last_choice(method, bb, s)
    if not s.channels_last and not bb.is_transformer:
        method.teacher_backbone.to(memory_format=torch.contiguous_format)
    loc = dino_local_size(s, bb)
    r = LightningStepRunner(method, s.precision, mode=mode, device=device, batch_size=s.batch_size, backbone=name,
                            detail=f"2x{s.image_size} + {s.dino_local_crops}x{loc} crops, out {s.dino_out_dim}, AdamW")
    r.task = "dino"
    if loaders is not None:
        r.set_loader(loaders.train)
    else:
        r.set_synthetic(synthetic_views(s, [s.image_size] * 2 + [loc] * s.dino_local_crops))
    return r


def build_seg_runner(s: BenchSettings, name: str, mode: str, device: torch.device) -> Runner:
    from core.config import SegmentConfig
    from core.data.voc import VOC_CLASSES
    from core.methods.segmentation import SegmentationMethod

    from core.runs.segment import backbone_options

    head = seg_head_for(_new_backbone(s, name), s.seg_head)
    mmseg = {"train_pipeline": "mmseg", "crop_size": s.image_size, "train_scale": s.image_size} \
        if s.seg_pipeline == "mmseg" else {}  # paper.yaml: crop 512 of RandomResize 512 x 0.5-2.0
    cfg = SegmentConfig(backbone=name, head=head, mode="finetune", batch_size=s.batch_size, compile=s.compile,
                        data=data_config(s), **mmseg)
    bb = _new_backbone(s, name, **backbone_options(cfg))  # as the run builds it (E1: dilated, stride 8)
    method = SegmentationMethod(cfg, NUM_CLASSES, VOC_CLASSES, backbone=bb)
    if not s.channels_last and not bb.is_transformer:
        method.channels_last = False
        method.model.to(memory_format=torch.contiguous_format)
    if s.compile:  # SegmentationMethod ignores cfg.compile: compile the Segmenter here
        method.model = torch.compile(method.model)
    r = LightningStepRunner(method, s.precision, mode=mode, device=device, batch_size=s.batch_size, backbone=name,
                            detail=f"head {head}, output stride {bb.stride}, CE, AdamW")
    r.task = "segment"
    if mode == "pipeline":
        from core.data.module import build_seg_loaders, seg_train_kwargs

        r.set_loader(build_seg_loaders(data_config(s), s.batch_size, seed=s.seed, **seg_train_kwargs(cfg)).train)
    else:
        g = torch.Generator().manual_seed(s.seed)
        x = torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=g)
        y = torch.randint(0, NUM_CLASSES, (s.batch_size, s.image_size, s.image_size), generator=g)
        y[:, :2] = 255  # a few void pixels, as VOC borders
        r.set_synthetic((x, y))
    return r


# --------------------------------------------------------------------------- timing
def measure(runners: Sequence[Runner], s: BenchSettings, device: torch.device) -> list[BenchRow]:
    """Warm every runner up, then time `repeats` blocks of `iters` steps, runners interleaved per block."""
    with warnings.catch_warnings():  # `self.log` without a Trainer warns; nothing to see in a benchmark
        warnings.filterwarnings("ignore", message=".*self.log.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return _measure(runners, s, device)


def _measure(runners: Sequence[Runner], s: BenchSettings, device: torch.device) -> list[BenchRow]:
    from core.flops import mfu

    fpi: list[Optional[int]] = []
    for r in runners:  # FLOPs of the real step on 2 real images of the batch, before any timing
        try:
            fpi.append(r.flops_per_image(r.next_batch()))
        except Exception as e:  # noqa: BLE001 - a benchmark row without FLOPs is still a measurement
            warnings.warn(f"{r.task}/{r.impl}: FLOPs not counted ({type(e).__name__}: {e})", RuntimeWarning)
            fpi.append(None)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    for r in runners:
        for _ in range(s.warmup):
            r.step(r.next_batch())
        sync(device)
    times: list[list[float]] = [[] for _ in runners]
    cpu: list[float] = [0.0 for _ in runners]
    waits: list[float] = [0.0 for _ in runners]
    peaks = [0.0 for _ in runners]
    kinds = ["" for _ in runners]
    losses = [float("nan") for _ in runners]
    for _ in range(s.repeats):
        for k, r in enumerate(runners):
            with PeakMemory(device) as mem:
                sync(device)
                c0 = _cpu_time()
                t0 = time.perf_counter()
                loss = None
                for _ in range(s.iters):
                    tw = time.perf_counter()
                    b = r.next_batch()
                    waits[k] += time.perf_counter() - tw
                    loss = r.step(b)
                sync(device)
                times[k].append((time.perf_counter() - t0) / s.iters)
                cpu[k] += _cpu_time() - c0
            peaks[k] = max(peaks[k], mem.peak_mb)
            kinds[k] = mem.kind
            losses[k] = float(loss.float().item()) if loss is not None else float("nan")
    rows = []
    for k, r in enumerate(runners):
        step_s = statistics.median(times[k])
        total = sum(times[k]) * s.iters
        rows.append(BenchRow(
            task=r.task, impl=r.impl, mode=r.mode, backbone=r.backbone, image_size=s.image_size,
            batch_size=s.batch_size, precision=s.precision, device=device.type, channels_last=s.channels_last,
            compile=s.compile, img_per_s=s.batch_size / step_s, step_ms=step_s * 1e3,
            best_step_ms=min(times[k]) * 1e3, cpu_ms=cpu[k] / (s.iters * s.repeats) * 1e3, peak_mem_mb=peaks[k],
            mem_kind=kinds[k], data_wait_frac=(waits[k] / total if r.mode == "pipeline" and total > 0 else None),
            loss=losses[k], iters=s.iters, repeats=s.repeats, detail=r.detail,
            flops_per_image=fpi[k], mfu=mfu(fpi[k], s.batch_size / step_s, gpu_name),
        ))
    return rows


# --------------------------------------------------------------------------- loss agreement
def compare_bt_losses(batch_size: int, dim: int, seed: int = 0, lambd: float = LAMBD) -> dict:
    """twinseg vs lightly Barlow Twins loss on the same (correlated, random) embeddings, float32 CPU."""
    from lightly.loss import BarlowTwinsLoss as LightlyLoss

    from core.losses.barlow_twins import BarlowTwinsLoss

    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch_size, dim, generator=g) * 3 + 1
    z2 = 0.7 * z1 + 0.5 * torch.randn(batch_size, dim, generator=g)
    ours = float(BarlowTwinsLoss(lambd=lambd)(z1, z2))
    theirs = float(LightlyLoss(lambda_param=lambd)(z1.clone(), z2.clone()))
    rel = abs(ours - theirs) / max(abs(theirs), 1e-12)
    return {"batch_size": batch_size, "dim": dim, "lambd": lambd, "twinseg": ours, "lightly": theirs,
            "rel_diff": rel, "factor": ours / theirs if theirs else float("nan"),
            "note": ("identical definition: per-dimension batch normalisation (biased variance, eps 1e-5), "
                     "C = z1n^T z2n / N, sum (1-C_ii)^2 + lambda sum_{i!=j} C_ij^2; twinseg computes it in "
                     "float32 even under bf16 autocast, lightly in the autocast dtype")}


# --------------------------------------------------------------------------- orchestration
def command_line(argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "experiments/bench.py", *map(shlex.quote, args)])


def run_bench(s: BenchSettings, command: str = "python experiments/bench.py",
              log: Optional[Callable[[str], None]] = None) -> BenchReport:
    """Validate `s`, run every (backbone, task, mode), return the report (rows, ratios, loss checks)."""
    s.validate()
    check_backbone_settings(s)
    if s.threads:
        torch.set_num_threads(int(s.threads))
    device = resolve_device(s.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    rep = BenchReport(machine=machine_description(device), torch=torch.__version__, command=command, date=date,
                      settings=asdict(s))
    say = log or (lambda m: None)
    for name in s.backbones:
        for task in s.tasks:
            for mode in s.modes:
                say(f"{task} / {name} / {mode} ...")
                if task == "barlow_twins":
                    runners = build_bt_runners(s, name, mode, device)
                elif task == "dino":
                    runners = [build_dino_runner(s, name, mode, device)]
                else:
                    runners = [build_seg_runner(s, name, mode, device)]
                try:
                    rows = measure(runners, s, device)
                finally:
                    for r in runners:
                        r.close()
                    del runners
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                for row in rows:
                    row.machine, row.torch, row.command, row.date = rep.machine, rep.torch, command, date
                rep.rows.extend(rows)
                if task == "barlow_twins" and s.lightly:
                    tw = next(r for r in rows if r.impl == "twinseg")
                    lt = next(r for r in rows if r.impl == "lightly")
                    rep.ratios.append({"backbone": name, "mode": mode, "twinseg_img_s": tw.img_per_s,
                                       "lightly_img_s": lt.img_per_s, "ratio": tw.img_per_s / lt.img_per_s,
                                       "ratio_best": lt.best_step_ms / tw.best_step_ms,
                                       "ratio_cpu": lt.cpu_ms / tw.cpu_ms if tw.cpu_ms > 0 else None})
    if s.lightly and "barlow_twins" in s.tasks:
        rep.loss_checks.append(compare_bt_losses(s.batch_size, int(s.projector[-1]), s.seed))
    return rep


# --------------------------------------------------------------------------- --suite gpu
#: the GPU suite's rows: (label, what it measures). Sizes on a GPU / in the tiny CPU fallback below.
SUITE_ITEMS = (
    ("bt-r50", "Barlow Twins ResNet-50, channels_last, 8192-8192-8192 projector, LARS"),
    ("bt-vits16", "Barlow Twins ViT-S/16 (fused attention), 8192-8192-8192 projector, LARS"),
    ("dino-vits16", "DINO ViT-S/16, 2 global + 6 local crops (paper.yaml), out 65536, AdamW"),
    ("e1-deeplabv3-r50", "E1: DeepLabV3 on a dilated ResNet-50 (output stride 8), crop 512"),
    ("e2-setr-vits16", "E2: SETR-PUP on ViT-S/16, crop 512"),
    ("e2-linear-vits16", "linear head on ViT-S/16, crop 512"),
    ("e2-setr-vits16-mmseg", "E2 with paper.yaml's mmseg loader (pipeline mode: worker regions, device crops), crop 512"),
)
SUITE_BEGIN = "<!-- bench-suite {kind} -->"
SUITE_END = "<!-- /bench-suite {kind} -->"


def suite_voc_root(n_train: int, sizes: Sequence[tuple[int, int]]) -> Path:
    """Generated JPEGs of VOC's sizes (500x375 and 375x500 on a GPU), created once and cached next to the
    project's other generated data (`core.data.synthetic.data_cache_dir`)."""
    from core.data.synthetic import data_cache_dir, generate_voc

    tag = "-".join(f"{w}x{h}" for w, h in sizes)
    return generate_voc(data_cache_dir() / f"bench-voc-{n_train}-{tag}", n_train=n_train, n_val=4, size=64,
                        seed=0, sizes=list(sizes))


def suite_plan(gpu: bool, workers: int, data_root: Optional[str] = None, seed: int = 0, compile_: bool = False,
               threads: Optional[int] = None, generate: bool = True) -> list[tuple[str, BenchSettings]]:
    """The suite: on a GPU the paper's sizes (224 px, batch 256, bf16, real pipeline on VOC-size JPEGs and
    a synthetic-batch row; crop 512 for E1 / E2); without a GPU a tiny CPU version of the same rows (small
    backbones, 64 px, one step) that exercises the same code paths."""
    if gpu:
        big = dict(precision="bf16", device="cuda", warmup=5, iters=10, repeats=3, lightly=False, seed=seed,
                   compile=compile_, threads=threads, channels_last=True)
        bt = dict(big, tasks=("barlow_twins",), modes=("model", "pipeline"), image_size=224, batch_size=256,
                  projector=(8192, 8192, 8192), workers=workers)
        seg = dict(big, tasks=("segment",), modes=("model",), image_size=512, batch_size=16, workers=workers)
        r50, vit = "resnet50", "vit_small_patch16"
        dino = dict(big, tasks=("dino",), modes=("model",), image_size=224, batch_size=128, dino_local_crops=6,
                    dino_out_dim=65536, workers=workers)
    else:
        big = dict(precision="32", device="cpu", warmup=1, iters=1, repeats=1, lightly=False, seed=seed,
                   compile=False, threads=threads, channels_last=True)
        bt = dict(big, tasks=("barlow_twins",), modes=("model", "pipeline"), image_size=64, batch_size=4,
                  projector=(64, 64, 64), workers=workers)
        seg = dict(big, tasks=("segment",), modes=("model",), image_size=64, batch_size=2, workers=workers)
        r50, vit = "resnet_tiny", "vit_nano_patch8"
        dino = dict(big, tasks=("dino",), modes=("model",), image_size=64, batch_size=4, dino_local_crops=2,
                    dino_out_dim=64, workers=workers)
    if data_root is None and generate:  # the pipeline rows read JPEGs of VOC's size (tiny ones on the CPU)
        sizes = ((500, 375), (375, 500)) if gpu else ((80, 60), (60, 80))
        data_root = str(suite_voc_root(max(16, 2 * int(bt["batch_size"])), sizes))
    bt["data_root"] = data_root
    return [
        ("bt-r50", BenchSettings(backbones=(r50,), **bt)),
        ("bt-vits16", BenchSettings(backbones=(vit,), **bt)),
        ("dino-vits16", BenchSettings(backbones=(vit,), **dino)),
        ("e1-deeplabv3-r50", BenchSettings(backbones=(r50,), seg_head="deeplabv3", **seg)),
        ("e2-setr-vits16", BenchSettings(backbones=(vit,), seg_head="setr_pup", **seg)),
        ("e2-linear-vits16", BenchSettings(backbones=(vit,), seg_head="linear", **seg)),
        ("e2-setr-vits16-mmseg", BenchSettings(backbones=(vit,), seg_head="setr_pup", seg_pipeline="mmseg",
                                               **{**seg, "modes": ("pipeline",), "data_root": data_root})),
    ]


def suite_rows(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """--rows: names of `SUITE_ITEMS` (and ddp-2); ConfigError naming an unknown one."""
    if text is None:
        return None
    names = tuple(v for v in str(text).split(",") if v)
    known = [k for k, _ in SUITE_ITEMS] + ["ddp-2"]
    bad = [v for v in names if v not in known]
    if bad or not names:
        raise ConfigError(f"--rows {text!r}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(known)}")
    return names


def run_suite(gpu: bool, workers: int, command: str, data_root: Optional[str] = None, seed: int = 0,
              compile_: bool = False, threads: Optional[int] = None, ddp: Optional[bool] = None,
              rows: Optional[Sequence[str]] = None, log: Optional[Callable[[str], None]] = None) -> BenchReport:
    """Every `suite_plan` row (or those named in `rows`), then the 2-process DDP check when 2 GPUs are
    visible (or `ddp=True`; `rows` without "ddp-2" skips it), in one report."""
    say = log or (lambda m: None)
    reads = {k for k, v in suite_plan(gpu, workers, "-", seed, compile_, threads, generate=False)
             if "pipeline" in v.modes}  # the rows that read JPEGs
    pipeline = rows is None or any(k in reads for k in rows)
    plan = [(k, v) for k, v in suite_plan(gpu, workers, data_root, seed, compile_, threads, generate=pipeline)
            if rows is None or k in rows]
    if rows is not None and "ddp-2" not in rows:
        ddp = False
    rep: Optional[BenchReport] = None
    if not plan:  # --rows ddp-2 alone
        dev = torch.device("cuda" if gpu else "cpu")
        rep = BenchReport(machine=machine_description(dev), torch=torch.__version__, command=command,
                          date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), settings={})
    for label, s in plan:
        say(f"suite {label} ...")
        r = run_bench(s, command, log=say)
        for row in r.rows:
            row.suite_item = label
        if rep is None:
            rep = r
            rep.settings = {"suite": "gpu" if gpu else "gpu (CPU fallback)", "rows": {k: asdict(v) for k, v in plan}}
        else:
            rep.rows.extend(r.rows)
    assert rep is not None
    n_gpu = torch.cuda.device_count() if gpu else 0
    if ddp if ddp is not None else n_gpu >= 2:
        say("suite ddp-2 ...")
        row = ddp_check(suite_plan(gpu, workers, data_root, seed, False, threads, generate=False)[0][1], gpu)
        row.machine, row.torch, row.command, row.date = rep.machine, rep.torch, command, rep.date
        rep.rows.append(row)
    elif gpu:
        rep.skipped.append(f"ddp-2: {n_gpu} GPU visible; the 2-process DDP check needs 2")
    return rep


# -- the 2-process DDP check: Barlow Twins' step as the official repo distributes it (one forward of both
# views through DistributedDataParallel, embeddings all-gathered with gradients in the loss, NCCL on GPUs,
# gloo on the CPU), batch per rank = the suite's, img/s of both ranks together
def _ddp_worker(rank: int, world: int, s: BenchSettings, gpu: bool, port: int, out: str) -> None:
    import torch as _torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    try:
        device = _torch.device("cuda", rank) if gpu else _torch.device("cpu")
        if gpu:
            _torch.cuda.set_device(device)
            _torch.backends.cudnn.benchmark = True
        if s.threads:
            _torch.set_num_threads(int(s.threads))
        cfg = pretrain_config(s, "barlow_twins", s.backbones[0])
        method = build_ssl_method(cfg, None, _new_backbone(s, s.backbones[0])).to(device)
        if gpu:
            method = _torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)

        class Pair(_torch.nn.Module):  # official Barlow Twins: both views in one forward
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x1, x2):
                return self.m.loss_fn(self.m(x1), self.m(x2))

        model = _torch.nn.parallel.DistributedDataParallel(Pair(method), device_ids=[rank] if gpu else None)
        opt = method.configure_optimizers()["optimizer"]
        g = _torch.Generator().manual_seed(s.seed + rank)
        x1, x2 = (_torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=g).to(device) for _ in range(2))
        if method.channels_last:
            x1, x2 = (x.contiguous(memory_format=_torch.channels_last) for x in (x1, x2))

        def step():
            with _autocast(device, s.precision):
                loss = model(x1, x2)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(max(1, s.warmup)):
            step()
        sync(device)
        dist.barrier()
        times = []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            for _ in range(s.iters):
                loss = step()
            sync(device)
            times.append((time.perf_counter() - t0) / s.iters)
        if rank == 0:
            Path(out).write_text(json.dumps({"step_s": statistics.median(times), "best_s": min(times),
                                             "loss": float(loss.detach().float().item())}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ddp_check(s: BenchSettings, gpu: bool, world: int = 2) -> BenchRow:
    """Barlow Twins (the suite's first row: ResNet-50 on a GPU) as 2 DDP processes on 2 GPUs (NCCL), or on
    the CPU (gloo) in the fallback; img/s = world x batch per rank / median step time."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.json")
        mp.spawn(_ddp_worker, args=(world, s, gpu, _free_port(), out), nprocs=world, join=True)
        res = json.loads(Path(out).read_text())
    total = world * s.batch_size
    return BenchRow(task="barlow_twins", impl="twinseg-ddp", mode="model", backbone=s.backbones[0],
                    image_size=s.image_size, batch_size=total, precision=s.precision,
                    device=f"{world}x {'cuda' if gpu else 'cpu'}", channels_last=s.channels_last, compile=False,
                    img_per_s=total / res["step_s"], step_ms=res["step_s"] * 1e3, best_step_ms=res["best_s"] * 1e3,
                    cpu_ms=0.0, peak_mem_mb=0.0, mem_kind="-", data_wait_frac=None, loss=res["loss"], iters=s.iters,
                    repeats=s.repeats, detail=f"{world} processes x batch {s.batch_size}, DDP "
                                                 f"({'NCCL' if gpu else 'gloo'}), embeddings all-gathered",
                    suite_item=f"ddp-{world}")


def suite_markdown(rep: BenchReport, gpu: bool) -> str:
    """The BENCHMARKS.md block of a suite run: machine, date, command, one row per measurement."""
    lines = [f"Measured {rep.date} on {rep.machine}, torch {rep.torch}; command `{rep.command}`.", "",
             "| row | task | mode | backbone | px | batch/GPU | prec | img/s | GFLOP/img | MFU | step ms | "
             "peak MB | data wait | detail |", "|" + "---|" * 14]
    for r in rep.rows:
        lines.append(f"| {r.suite_item} | {r.task} | {r.mode} | {r.backbone} | {r.image_size} | {r.batch_size} "
                     f"| {r.precision} | {r.img_per_s:.1f} | {_fmt_gflop(r.flops_per_image)} | {_fmt_mfu(r.mfu)} "
                     f"| {r.step_ms:.1f} | {r.peak_mem_mb:.0f} | {_fmt_wait(r.data_wait_frac)} | {r.detail} |")
    for sk in rep.skipped:
        lines.append(f"\nSkipped: {sk}.")
    if not gpu:
        lines.append("\nCPU fallback (no GPU visible): tiny backbones, 64 px, one timed step per row; it checks that "
                     "every code path of the suite runs, its numbers are not GPU figures.")
    return "\n".join(lines)


def update_benchmarks(path: Path, block: str, gpu: bool) -> None:
    """Replace (or append) the suite's block in BENCHMARKS.md, between its markers, atomically."""
    from core.io import atomic_write_text

    kind = "gpu" if gpu else "cpu-fallback"
    begin, end = SUITE_BEGIN.format(kind=kind), SUITE_END.format(kind=kind)
    text = path.read_text() if path.is_file() else "# twinseg benchmarks\n"
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        title = "## GPU suite (`python experiments/bench.py --suite gpu`)" if gpu else \
            "## GPU suite, CPU fallback (`python experiments/bench.py --suite gpu` without a GPU)"
        text = text.rstrip("\n") + f"\n\n{title}\n\n{new}\n"
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- output
MD_HEADER = ("| date | machine | torch | task | impl | mode | backbone | px | batch | prec | ch-last | compile "
             "| img/s | GFLOP/img | MFU | step ms | best ms | CPU ms | peak MB | data wait | command |")
MD_SEP = "|" + "---|" * 21


def _fmt_wait(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _fmt_gflop(v: Optional[float]) -> str:
    return "-" if not v else f"{v / 1e9:.3g}"


def _fmt_mfu(v: Optional[float]) -> str:
    """MFU in percent; '-' on the CPU or an unknown GPU (no peak to compare with)."""
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown_rows(rep: BenchReport, header: bool = True) -> str:
    lines = [MD_HEADER, MD_SEP] if header else []
    for r in rep.rows:
        mem = f"{r.peak_mem_mb:.0f}" + (" (RSS)" if r.mem_kind == "cpu_peak_rss" else "")
        lines.append(
            f"| {r.date} | {r.machine} | {r.torch} | {r.task} | {r.impl} | {r.mode} | {r.backbone} | {r.image_size} "
            f"| {r.batch_size} | {r.precision} | {'yes' if r.channels_last else 'no'} | {'yes' if r.compile else 'no'} "
            f"| {r.img_per_s:.1f} | {_fmt_gflop(r.flops_per_image)} | {_fmt_mfu(r.mfu)} | {r.step_ms:.1f} "
            f"| {r.best_step_ms:.1f} | {r.cpu_ms:.0f} | {mem} "
            f"| {_fmt_wait(r.data_wait_frac)} | `{r.command}` |")
    return "\n".join(lines)


def print_report(rep: BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=200)
    t = Table(title=f"twinseg bench - {rep.machine} - torch {rep.torch} - {rep.date}")
    num = ("px", "batch", "img/s", "GFLOP/img", "MFU", "step ms", "best ms", "CPU ms", "peak MB", "data wait", "loss")
    for col in ("task", "impl", "mode", "backbone", "px", "batch", "prec", "img/s", "GFLOP/img", "MFU", "step ms",
                "best ms", "CPU ms", "peak MB", "data wait", "loss", "detail"):
        t.add_column(col, justify="right" if col in num else "left")
    for r in rep.rows:
        t.add_row(r.task, r.impl, r.mode, r.backbone, str(r.image_size), str(r.batch_size), r.precision,
                  f"{r.img_per_s:.1f}", _fmt_gflop(r.flops_per_image), _fmt_mfu(r.mfu), f"{r.step_ms:.1f}", f"{r.best_step_ms:.1f}", f"{r.cpu_ms:.0f}",
                  f"{r.peak_mem_mb:.0f}", _fmt_wait(r.data_wait_frac),
                  f"{r.loss:.4g}", r.detail)
    con.print(t)
    mem_note = ("peak MB = torch.cuda.max_memory_allocated" if any(r.mem_kind == "cuda_max_allocated" for r in rep.rows)
                else "peak MB = peak resident set size of the whole process during the timed steps")
    con.print(f"[dim]{mem_note}; GFLOP/img = forward + backward of one image, all views (core/flops.py); MFU = "
              f"GFLOP/img x img/s / the GPU's dense bf16 peak ('-': CPU or a GPU not in core/flops.py); "
              f"command: {rep.command}[/dim]")
    for q in rep.ratios:
        con.print(f"Barlow Twins twinseg/lightly img/s ({q['backbone']}, {q['mode']}): "
                  f"{q['twinseg_img_s']:.1f} / {q['lightly_img_s']:.1f} = [bold]{q['ratio']:.2f}x[/bold] "
                  f"(best block {q['ratio_best']:.2f}x, CPU time {q['ratio_cpu'] or float('nan'):.2f}x)")
    by = {(r.task, r.impl, r.backbone, r.mode): r for r in rep.rows}
    for (task, impl, bb, mode), r in by.items():
        if mode == "pipeline" and (task, impl, bb, "model") in by:
            m = by[(task, impl, bb, "model")]
            con.print(f"pipeline/model img/s ({task}, {impl}, {bb}): {r.img_per_s:.1f} / {m.img_per_s:.1f} = "
                      f"{r.img_per_s / m.img_per_s:.2f} (data wait {_fmt_wait(r.data_wait_frac)})")
    for c in rep.loss_checks:
        con.print(f"loss check (N={c['batch_size']}, D={c['dim']}, lambda={c['lambd']}): twinseg {c['twinseg']:.6g} "
                  f"lightly {c['lightly']:.6g} rel diff {c['rel_diff']:.2e}")


# --------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise ConfigError(f"{message}; see python experiments/bench.py --help")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).replace(",", "-").split("-") if v != "")
    except ValueError:
        raise ConfigError(f"--projector {text!r} must be widths joined by '-', e.g. 8192-8192-8192") from None


def _names(values: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        out.extend(p for p in str(v).split(",") if p)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python experiments/bench.py",
                description="images/s and peak memory of one training step (Barlow Twins, DINO, segmentation), "
                            "model only and with the data pipeline, next to lightly's Barlow Twins.")
    p.add_argument("--backbone", nargs="+", default=list(DEFAULT_BACKBONES),
                   help="one or more backbone names (space or comma separated); default vit_nano_patch8 resnet_tiny")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="barlow_twins dino segment (default: all)")
    p.add_argument("--mode", default="both", help="model | pipeline | both (default)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="32", help="32 (default) | bf16 (autocast)")
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last for CNN backbones (default on, as in training)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone / segmenter")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--iters", type=int, default=2, help="timed steps per block (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed blocks, runners interleaved; the median block is reported (default 3)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers in pipeline mode (default: min(8, CPU cores))")
    p.add_argument("--projector", default="512-512-512", help="Barlow Twins projector widths (default 512-512-512)")
    p.add_argument("--dino-out-dim", type=int, default=1024)
    p.add_argument("--dino-local-crops", type=int, default=2)
    p.add_argument("--seg-head", default="auto", help="auto (setr_pup for ViT/Swin, deeplabv3 for CNN) or a head name")
    p.add_argument("--seg-pipeline", default="simple",
                   help="segmentation train pipeline of the pipeline mode: simple or mmseg (paper.yaml's 512 px "
                        "recipe; crop and resize scale = --image-size)")
    p.add_argument("--lightly", action=argparse.BooleanOptionalAction, default=True,
                   help="run lightly's Barlow Twins side by side (default on)")
    p.add_argument("--data-root", default=None, help="VOC root for pipeline mode (default: generated dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: one per core); 1 is steadier on a shared, loaded CPU")
    p.add_argument("--suite", default=None, choices=SUITES,
                   help="gpu: the fixed GPU check (Barlow Twins ResNet-50 and ViT-S/16 at 224 px, batch 256, bf16, "
                        "real pipeline and synthetic batches; DINO ViT-S/16; E1 / E2 steps; 2-process DDP with 2 "
                        "GPUs; <= 8 min on one H100/H200; a tiny CPU version without a GPU), prints img/s and MFU "
                        "and updates --benchmarks; only --device, --workers, --data-root, --seed, --threads, "
                        "--compile, --json, --markdown apply to it. loader: experiments/bench_loader.py (loader "
                        "img/s per worker per recipe); the other flags go to it")
    p.add_argument("--benchmarks", default=str(REPO_ROOT / "BENCHMARKS.md"), metavar="PATH",
                   help="--suite gpu: the markdown file whose suite table is replaced (default BENCHMARKS.md)")
    p.add_argument("--no-update", action="store_true", help="--suite gpu: do not touch --benchmarks")
    p.add_argument("--rows", default=None,
                   help=f"--suite gpu: only these rows, comma separated (default all: {', '.join(k for k, _ in SUITE_ITEMS)}, "
                        f"ddp-2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="PATH",
                   help="print markdown rows for BENCHMARKS.md (or write them to PATH)")
    return p


def settings_from_args(a: argparse.Namespace) -> BenchSettings:
    mode = str(a.mode)
    modes = MODES if mode == "both" else (mode,)
    workers = a.workers if a.workers is not None else min(8, os.cpu_count() or 1)
    return BenchSettings(
        backbones=_names(a.backbone), tasks=_names(a.tasks), modes=modes, image_size=a.image_size,
        batch_size=a.batch_size, precision=str(a.precision), device=str(a.device), channels_last=a.channels_last,
        compile=a.compile, warmup=a.warmup, iters=a.iters, repeats=a.repeats, workers=workers,
        projector=_int_list(a.projector), dino_out_dim=a.dino_out_dim, dino_local_crops=a.dino_local_crops,
        seg_head=str(a.seg_head), seg_pipeline=str(a.seg_pipeline), lightly=a.lightly, data_root=a.data_root,
        seed=a.seed, threads=a.threads,
    )


def _suite_of(argv: Sequence[str]) -> Optional[str]:
    for i, v in enumerate(argv):
        if v == "--suite" and i + 1 < len(argv):
            return argv[i + 1]
        if v.startswith("--suite="):
            return v.split("=", 1)[1]
    return None


def _without_suite(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for v in argv:
        if skip:
            skip = False
        elif v == "--suite":
            skip = True
        elif not v.startswith("--suite="):
            out.append(v)
    return out


def run_loader_suite(argv: Sequence[str]) -> int:
    """--suite loader: experiments/bench_loader.py's `main` with the other flags (loader img/s per worker)."""
    try:
        from experiments.bench_loader import main as loader_main
    except ImportError as e:
        raise ConfigError(f"--suite loader needs experiments/bench_loader.py ({e}); run it from a full checkout") from None
    return int(loader_main(list(argv)) or 0)


@guard
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if _suite_of(args) == "loader" and not ({"-h", "--help"} & set(args)):
        return run_loader_suite(_without_suite(args))
    a = build_parser().parse_args(args)
    s = settings_from_args(a)
    if a.suite is None:
        s.validate()
    else:
        s.validate_numbers()
        if s.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible; use --device auto or cpu")
    if a.json:
        jp = Path(a.json).expanduser()
        if not jp.parent.is_dir():
            raise ConfigError(f"--json {a.json}: folder {jp.parent} does not exist; create it or choose another path")
    bp = Path(a.benchmarks).expanduser()
    rows = suite_rows(a.rows) if a.suite == "gpu" else None
    if a.suite == "gpu" and not a.no_update and not bp.parent.is_dir():
        raise ConfigError(f"--benchmarks {a.benchmarks}: folder {bp.parent} does not exist; choose another path")
    from rich.console import Console

    con = Console(stderr=True)
    t0 = time.perf_counter()
    say = lambda m: con.print(f"[dim]{m}[/dim]")  # noqa: E731
    if a.suite == "gpu":
        gpu = resolve_device(s.device).type == "cuda"
        workers = a.workers if a.workers is not None else (min(16, os.cpu_count() or 1) if gpu else 0)
        rep = run_suite(gpu, workers, command_line(argv), data_root=a.data_root, seed=a.seed, compile_=a.compile,
                        threads=a.threads, ddp=None if gpu else True, rows=rows, log=say)  # CPU: the DDP path on gloo
        if not a.no_update:
            update_benchmarks(bp, suite_markdown(rep, gpu), gpu)
            con.print(f"[dim]updated {bp}[/dim]")
    else:
        rep = run_bench(s, command_line(argv), log=say)
    print_report(rep)
    con.print(f"[dim]total {time.perf_counter() - t0:.1f} s[/dim]")
    if a.json:
        Path(a.json).expanduser().write_text(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
    if a.markdown is not None:
        md = markdown_rows(rep)
        if a.markdown == "-":
            print(md)
        else:
            Path(a.markdown).expanduser().write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
