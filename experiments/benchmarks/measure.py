"""The measurement half of a row: timing, peak memory, FLOPs / MFU, and the report that holds the rows.

Timing: ``warmup`` steps, then ``repeats`` blocks of ``iters`` steps, the runners of one row interleaved per
block (so machine drift hits both sides of a comparison; torch.cuda.synchronize at block edges on a GPU);
img/s = batch / median step time. Peak memory: torch.cuda.max_memory_allocated over the timed steps on a
GPU; on the CPU the peak resident set size of the process sampled every 5 ms during the timed steps
(process-wide: interpreter, libraries and model included). ``data wait``: the share of the step time spent
waiting for the loader (pipeline mode). GFLOP/img: forward + backward of one image with all its views,
FlopCounterMode on the real step over 2 images (core/flops.py); MFU: GFLOP/img x img/s / the GPU's dense
bf16 peak (`core.flops.mfu`; None on the CPU or an unknown GPU).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from experiments.benchmarks.rows import BenchCase
from experiments.benchmarks.runners import Runner
from experiments.benchmarks.settings import BenchSettings


@dataclass
class BenchRow:
    """One measurement of one runner of a row; `stage` / `evaluation` / `config` are the row's run config."""

    task: str
    impl: str  # twinseg | lightly | twinseg-ddp
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
    stage: str = ""  # core/stages.py: pretrain | segment
    evaluation: Optional[str] = None  # the segmentation row's preset (core/evaluations.py)
    config: dict = field(default_factory=dict)  # the row's PretrainConfig / SegmentConfig (to_dict)
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

    @classmethod
    def new(cls, device: torch.device, command: str, settings: dict) -> "BenchReport":
        date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        return cls(machine=machine_description(device), torch=torch.__version__, command=command, date=date,
                   settings=settings)

    def add(self, rows: Sequence[BenchRow]) -> None:
        for row in rows:
            row.machine, row.torch, row.command, row.date = self.machine, self.torch, self.command, self.date
        self.rows.extend(rows)


# --------------------------------------------------------------------------- machine
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# --------------------------------------------------------------------------- timing
def measure(runners: Sequence[Runner], s: BenchSettings, device: torch.device) -> list[BenchRow]:
    """FLOPs first (2 real images of each runner's batch), warm every runner up, then time `repeats` blocks
    of `iters` steps, runners interleaved per block."""
    with warnings.catch_warnings():  # `self.log` without a Trainer warns; nothing to see in a benchmark
        warnings.filterwarnings("ignore", message=".*self.log.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        fpi = [_flops(r) for r in runners]
        for r in runners:
            for _ in range(s.warmup):
                r.step(r.next_batch())
            sync(device)
        timings = [_Timing() for _ in runners]
        for _ in range(s.repeats):
            for r, t in zip(runners, timings):
                t.block(r, s.iters, device)
    return [_row(r, t, f, s, device) for r, t, f in zip(runners, timings, fpi)]


def _flops(r: Runner) -> Optional[int]:
    try:
        return r.flops_per_image(r.next_batch())
    except Exception as e:  # noqa: BLE001 - a benchmark row without FLOPs is still a measurement
        warnings.warn(f"{r.task}/{r.impl}: FLOPs not counted ({type(e).__name__}: {e})", RuntimeWarning)
        return None


@dataclass
class _Timing:
    times: list = field(default_factory=list)  # mean step time of each block
    cpu: float = 0.0
    wait: float = 0.0
    peak_mb: float = 0.0
    mem_kind: str = ""
    loss: float = float("nan")

    def block(self, r: Runner, iters: int, device: torch.device) -> None:
        with PeakMemory(device) as mem:
            sync(device)
            c0, t0 = _cpu_time(), time.perf_counter()
            loss = None
            for _ in range(iters):
                tw = time.perf_counter()
                b = r.next_batch()
                self.wait += time.perf_counter() - tw
                loss = r.step(b)
            sync(device)
            self.times.append((time.perf_counter() - t0) / iters)
            self.cpu += _cpu_time() - c0
        self.peak_mb, self.mem_kind = max(self.peak_mb, mem.peak_mb), mem.kind
        self.loss = float(loss.float().item()) if loss is not None else float("nan")


def _row(r: Runner, t: _Timing, fpi: Optional[int], s: BenchSettings, device: torch.device) -> BenchRow:
    from core.flops import mfu

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cfg = r.case.config
    step_s = statistics.median(t.times)
    total = sum(t.times) * s.iters
    return BenchRow(
        task=r.task, impl=r.impl, mode=r.mode, backbone=r.backbone, image_size=cfg.data.image_size,
        batch_size=r.batch_size, precision=s.precision, device=device.type, channels_last=s.channels_last,
        compile=cfg.compile, img_per_s=r.batch_size / step_s, step_ms=step_s * 1e3,
        best_step_ms=min(t.times) * 1e3, cpu_ms=t.cpu / (s.iters * s.repeats) * 1e3, peak_mem_mb=t.peak_mb,
        mem_kind=t.mem_kind, data_wait_frac=(t.wait / total if r.mode == "pipeline" and total > 0 else None),
        loss=t.loss, iters=s.iters, repeats=s.repeats, detail=r.detail, flops_per_image=fpi,
        mfu=mfu(fpi, r.batch_size / step_s, gpu_name), stage=r.case.stage, evaluation=r.case.evaluation,
        config=cfg.to_dict())


def time_case(case: BenchCase, s: BenchSettings, device: torch.device) -> list[BenchRow]:
    """Build the row's runners (`runners.build_runners`), measure them, free them (loader workers stopped,
    CUDA cache emptied) before the next row."""
    import gc

    from experiments.benchmarks.runners import build_runners

    runners = build_runners(case, s, device)
    try:
        return measure(runners, s, device)
    finally:
        for r in runners:
            r.close()
        del runners
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
