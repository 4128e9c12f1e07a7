"""Throughput benchmark: images/s and peak memory of ONE training step (forward + backward + optimiser).

    python experiments/bench.py                                   # CPU-sized default, < 2 min on 2 cores
    python experiments/bench.py --backbone resnet50 vit_small_patch16 --image-size 224 \\
        --batch-size 256 --precision bf16 --projector 8192-8192-8192 --json bench.json --markdown

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

    def close(self) -> None:
        """Stop the loader's (persistent) workers now, so they cannot compete with the next measurement."""
        for it in (self._it, getattr(self._loader, "_iterator", None)):
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
        self._it = None
        self._loader = None


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

    def step(self, batch):
        views = batch[0] if isinstance(batch[0], (list, tuple)) else batch
        x1, x2 = self._prep(views[0], 0), self._prep(views[1], 1)
        with _autocast(self.device, self.precision):
            z1 = self.head(self.encoder(x1))
            z2 = self.head(self.encoder(x2))
            loss = self.criterion(z1, z2)
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


def _new_backbone(s: BenchSettings, name: str):
    from core.models.registry import create_backbone

    torch.manual_seed(s.seed)
    return create_backbone(name, image_size=s.image_size)


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

    bb = _new_backbone(s, name)
    head = seg_head_for(bb, s.seg_head)
    cfg = SegmentConfig(backbone=name, head=head, mode="finetune", batch_size=s.batch_size, compile=s.compile,
                        data=data_config(s))
    method = SegmentationMethod(cfg, NUM_CLASSES, VOC_CLASSES, backbone=bb)
    if not s.channels_last and not bb.is_transformer:
        method.channels_last = False
        method.model.to(memory_format=torch.contiguous_format)
    if s.compile:  # SegmentationMethod ignores cfg.compile: compile the Segmenter here
        method.model = torch.compile(method.model)
    r = LightningStepRunner(method, s.precision, mode=mode, device=device, batch_size=s.batch_size, backbone=name,
                            detail=f"head {head}, CE, AdamW")
    r.task = "segment"
    if mode == "pipeline":
        from core.data.module import build_seg_loaders

        r.set_loader(build_seg_loaders(data_config(s), s.batch_size, seed=s.seed).train)
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


# --------------------------------------------------------------------------- output
MD_HEADER = ("| date | machine | torch | task | impl | mode | backbone | px | batch | prec | ch-last | compile "
             "| img/s | step ms | best ms | CPU ms | peak MB | data wait | command |")
MD_SEP = "|" + "---|" * 19


def _fmt_wait(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown_rows(rep: BenchReport, header: bool = True) -> str:
    lines = [MD_HEADER, MD_SEP] if header else []
    for r in rep.rows:
        mem = f"{r.peak_mem_mb:.0f}" + (" (RSS)" if r.mem_kind == "cpu_peak_rss" else "")
        lines.append(
            f"| {r.date} | {r.machine} | {r.torch} | {r.task} | {r.impl} | {r.mode} | {r.backbone} | {r.image_size} "
            f"| {r.batch_size} | {r.precision} | {'yes' if r.channels_last else 'no'} | {'yes' if r.compile else 'no'} "
            f"| {r.img_per_s:.1f} | {r.step_ms:.1f} | {r.best_step_ms:.1f} | {r.cpu_ms:.0f} | {mem} "
            f"| {_fmt_wait(r.data_wait_frac)} | `{r.command}` |")
    return "\n".join(lines)


def print_report(rep: BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=200)
    t = Table(title=f"twinseg bench - {rep.machine} - torch {rep.torch} - {rep.date}")
    num = ("px", "batch", "img/s", "step ms", "best ms", "CPU ms", "peak MB", "data wait", "loss")
    for col in ("task", "impl", "mode", "backbone", "px", "batch", "prec", "img/s", "step ms", "best ms", "CPU ms",
                "peak MB", "data wait", "loss", "detail"):
        t.add_column(col, justify="right" if col in num else "left")
    for r in rep.rows:
        t.add_row(r.task, r.impl, r.mode, r.backbone, str(r.image_size), str(r.batch_size), r.precision,
                  f"{r.img_per_s:.1f}", f"{r.step_ms:.1f}", f"{r.best_step_ms:.1f}", f"{r.cpu_ms:.0f}",
                  f"{r.peak_mem_mb:.0f}", _fmt_wait(r.data_wait_frac),
                  f"{r.loss:.4g}", r.detail)
    con.print(t)
    mem_note = ("peak MB = torch.cuda.max_memory_allocated" if any(r.mem_kind == "cuda_max_allocated" for r in rep.rows)
                else "peak MB = peak resident set size of the whole process during the timed steps")
    con.print(f"[dim]{mem_note}; command: {rep.command}[/dim]")
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
    p.add_argument("--lightly", action=argparse.BooleanOptionalAction, default=True,
                   help="run lightly's Barlow Twins side by side (default on)")
    p.add_argument("--data-root", default=None, help="VOC root for pipeline mode (default: generated dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: one per core); 1 is steadier on a shared, loaded CPU")
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
        seg_head=str(a.seg_head), lightly=a.lightly, data_root=a.data_root, seed=a.seed, threads=a.threads,
    )


@guard
def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    s = settings_from_args(a)
    s.validate()
    if a.json:
        jp = Path(a.json).expanduser()
        if not jp.parent.is_dir():
            raise ConfigError(f"--json {a.json}: folder {jp.parent} does not exist; create it or choose another path")
    from rich.console import Console

    con = Console(stderr=True)
    t0 = time.perf_counter()
    rep = run_bench(s, command_line(argv), log=lambda m: con.print(f"[dim]{m}[/dim]"))
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
