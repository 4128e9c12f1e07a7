"""Compute accounting for every run: wall time, device-seconds, images/s, peak memory, FLOPs, MFU.

Definitions (so Barlow Twins and DINO compare at equal budget):
- `wall_time_s`: seconds spent inside `trainer.fit` (training + validation), summed over ALL attempts
  in the run folder, killed ones included: the time an attempt spent after its last checkpoint (lost
  work, redone on resume) is compute the run cost, so it counts (see "Killed attempts" below).
- `device_seconds`: on GPU, wall time x number of GPUs; on CPU, the process' CPU time (user + sys),
  i.e. core-seconds actually consumed, killed attempts included. Under DDP (`trainer.world_size` > 1,
  e.g. a grid trial on several GPUs through Ray Train) every rank counts: GPU wall time x world size;
  on CPU the CPU time summed over the ranks (each rank's in `device_seconds_per_worker`, with `workers`).
- `images_per_s`: training images (not views) processed per second of training-loop time, all
  ranks together (a rank's batch x world size per step), over the work that survives in the
  checkpoint (epochs redone after a kill are counted once, with their time).
- `peak_mem_mb`: peak GPU memory allocated (torch.cuda.max_memory_allocated) on GPU; peak resident
  set size of the process on CPU (rank 0's under DDP); the maximum over attempts.
- `flops_per_image`: forward + backward FLOPs of one training image with all its views, counted once at
  run start (core/flops.py: torch's FlopCounterMode, FMA = 2 FLOPs); None when it could not be counted.
- `mfu`: flops_per_image x images_per_s / (the GPU's dense bf16 peak x GPUs) (core/flops.py
  `PEAK_BF16_TFLOPS`); None on the CPU and on a GPU not in that table.

Killed attempts: rank 0 keeps `<run folder>/accounting.json` (ACCOUNTING_FILE, written atomically
with core.io) up to date with the run's totals so far INCLUDING the running attempt: at every
checkpoint, every training epoch end, every `persist_every_s` seconds (default 30) of training
steps and when `trainer.fit` raises. A new attempt (resume after a kill, or a restart of an attempt killed before its first
checkpoint) reads it at `on_fit_start` and adds the attempt's own time to those totals, so a kill
loses at most `persist_every_s` seconds of accounted time. The file belongs to the folder's run: the
skeleton refuses a folder holding another config and `--overwrite` deletes the file with the run's
other files (core/runs/skeleton.py `RUN_FOLDER_ENTRIES`). Without the file (run folders from before it existed) the totals restored from last.ckpt are used, as before.
Under DDP on CPU, the other ranks' CPU seconds after the last completed attempt are estimated by rank
0's own (only rank 0 writes files; no collective call outside `on_fit_end`).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback

from core.data.batch import batch_size

ACCOUNTING_FILE = "accounting.json"
PERSIST_EVERY_S = 30.0


def _cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def read_accounting(out_dir) -> Optional[dict]:
    """The totals persisted in `out_dir/accounting.json`, or None (absent or unreadable)."""
    try:
        data = json.loads((Path(out_dir) / ACCOUNTING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("wall_time_s"), (int, float)):
        return None
    return data


class AccountingCallback(Callback):
    """Measures the run's compute; state survives checkpoint/resume and, through accounting.json in
    `out_dir`, killed attempts (see the module docstring)."""

    def __init__(self, out_dir=None, flops_per_image: Optional[float] = None,
                 persist_every_s: Optional[float] = None) -> None:
        self.state = {"wall_time_s": 0.0, "train_time_s": 0.0, "cpu_seconds": 0.0, "images": 0, "peak_mem_mb": 0.0}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.flops_per_image = flops_per_image
        self.persist_every_s = float(PERSIST_EVERY_S if persist_every_s is None else persist_every_s)
        self._t0 = self._cpu0 = self._e0 = 0.0
        self._last_persist = 0.0
        self._in_fit = False
        self._prior: Optional[dict] = None  # accounting.json as found at this attempt's start
        self._writer = True
        self._device = "cpu"
        self._torch_device = torch.device("cpu")
        self._n_devices = 1

    # -- fit span
    def on_fit_start(self, trainer, pl_module) -> None:
        self._device = pl_module.device.type
        # kept: at on_fit_end Lightning's teardown has moved the module to the CPU already
        self._torch_device = pl_module.device
        # world size, not num_devices: a rank of an externally launched DDP job (Ray Train) drives
        # one device but counts for all of them; in one process with Lightning's own DDP both agree
        self._n_devices = max(1, int(trainer.world_size))
        self._writer = bool(trainer.is_global_zero)
        if self._device == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._prior = read_accounting(self.out_dir) if self.out_dir is not None else None
        self._t0, self._cpu0 = time.perf_counter(), _cpu_time()
        self._last_persist = self._t0
        self._in_fit = True

    def on_fit_end(self, trainer, pl_module) -> None:
        wall, cpu = time.perf_counter() - self._t0, _cpu_time() - self._cpu0
        base = self._base()
        self.state["wall_time_s"] = base["wall_time_s"] + wall
        self.state["cpu_seconds"] = base["cpu_seconds"]
        if self._n_devices > 1:
            # every rank runs on_fit_end: one all_gather (same call on all ranks) of each rank's time
            per = self._gather(trainer, [wall, cpu])
            own = per[:, 1] if self._device == "cpu" else per[:, 0]
            old = base.get("device_seconds_per_worker") or [0.0] * len(own)
            if len(old) != len(own):  # resumed with another world size: restart the per-rank split
                old = [sum(old) / len(own)] * len(own)
            self.state["device_seconds_per_worker"] = [a + float(b) for a, b in zip(old, own)]
            self.state["cpu_seconds"] += float(per[:, 1].sum())
        else:
            self.state["cpu_seconds"] += cpu
        self.state["peak_mem_mb"] = max(self.state["peak_mem_mb"], float(base.get("peak_mem_mb") or 0.0))
        self._update_peak(pl_module)
        self._in_fit = False
        self._persist(finished_fit=True)

    def _base(self) -> dict:
        """The totals before this attempt: accounting.json when it was there at the start (it includes
        any killed attempt), else what last.ckpt restored into `state` (or zeros)."""
        src = self._prior if self._prior is not None else self.state
        return {"wall_time_s": float(src.get("wall_time_s") or 0.0), "cpu_seconds": float(src.get("cpu_seconds") or 0.0),
                "peak_mem_mb": float(src.get("peak_mem_mb") or 0.0),
                "device_seconds_per_worker": src.get("device_seconds_per_worker")}

    def _live(self) -> dict:
        """Totals including the running attempt up to now (what accounting.json holds)."""
        base = self._base()
        out = {
            "wall_time_s": float(self.state["wall_time_s"]),
            "cpu_seconds": float(self.state["cpu_seconds"]),
            "peak_mem_mb": float(self.state["peak_mem_mb"]),
            "train_time_s": float(self.state["train_time_s"]),
            "images": int(self.state["images"]),
        }
        if "device_seconds_per_worker" in self.state:
            out["device_seconds_per_worker"] = list(self.state["device_seconds_per_worker"])
        if self._in_fit:
            wall, cpu = time.perf_counter() - self._t0, _cpu_time() - self._cpu0
            out["wall_time_s"] = float(base["wall_time_s"] or 0.0) + wall
            n = self._n_devices
            out["cpu_seconds"] = float(base["cpu_seconds"] or 0.0) + cpu * n  # other ranks: estimated by rank 0
            old = base.get("device_seconds_per_worker")
            if n > 1:
                own = cpu if self._device == "cpu" else wall
                old = old if old and len(old) == n else [sum(old or [0.0]) / n] * n
                out["device_seconds_per_worker"] = [float(v) + own for v in old]
            out["peak_mem_mb"] = max(out["peak_mem_mb"], float(base.get("peak_mem_mb") or 0.0))
        return out

    def _persist(self, finished_fit: bool = False) -> None:
        """Write accounting.json (rank 0 only, atomically)."""
        if self.out_dir is None or not self._writer or not self.out_dir.is_dir():
            return
        from core.io import atomic_write_json

        data = {"n_devices": self._n_devices, "device": self._device,
                "finished_fit": finished_fit, **self._live()}
        atomic_write_json(self.out_dir / ACCOUNTING_FILE, data)
        self._last_persist = time.perf_counter()

    @staticmethod
    def _gather(trainer, values: list) -> torch.Tensor:
        """(world, len(values)) float64 on the CPU: `values` of every rank, in rank order."""
        dev = getattr(trainer.strategy, "root_device", torch.device("cpu"))
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        out = trainer.strategy.all_gather(t)
        return out.reshape(-1, len(values)).cpu()

    # -- training-loop time and images
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._e0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._device == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.state["train_time_s"] += time.perf_counter() - self._e0
        self._update_peak(pl_module)
        self._persist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.state["images"] += batch_size(batch) * self._n_devices
        if self._writer and time.perf_counter() - self._last_persist >= self.persist_every_s:
            self._update_peak(pl_module)
            self._persist()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._persist()

    def on_exception(self, trainer, pl_module, exception) -> None:
        """An attempt that fails with an exception (not a SIGKILL) records its time up to now."""
        if self._in_fit:
            self._update_peak(pl_module)
            self._persist()

    def _update_peak(self, pl_module) -> None:
        if self._device == "cuda":
            peak = torch.cuda.max_memory_allocated(self._torch_device) / 2**20
        else:
            peak = _peak_rss_mb()
        self.state["peak_mem_mb"] = max(self.state["peak_mem_mb"], peak)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.update(state_dict)

    def summary(self) -> dict:
        from core.flops import mfu

        s = self.state
        gpu = self._device == "cuda"
        name = torch.cuda.get_device_name(self._torch_device) if gpu else "cpu"
        images_per_s = round(s["images"] / s["train_time_s"], 2) if s["train_time_s"] > 0 else 0.0
        util = mfu(self.flops_per_image, images_per_s, name if gpu else None, self._n_devices)
        out = {
            "wall_time_s": round(s["wall_time_s"], 3),
            "device_seconds": round(s["wall_time_s"] * self._n_devices if gpu else s["cpu_seconds"], 3),
            "device": f"{self._n_devices}x {name}" if gpu else f"cpu ({os.cpu_count()} cores)",
            "images_per_s": images_per_s,
            "train_images": int(s["images"]),
            "peak_mem_mb": round(s["peak_mem_mb"], 1),
            "flops_per_image": int(self.flops_per_image) if self.flops_per_image else None,
            "mfu": round(util, 4) if util is not None else None,
        }
        if self._n_devices > 1 and "device_seconds_per_worker" in s:  # DDP across processes (all ranks counted)
            if not gpu:
                out["device"] = f"{self._n_devices}x cpu ({os.cpu_count()} cores)"
            out["workers"] = self._n_devices
            out["device_seconds_per_worker"] = [round(v, 3) for v in s["device_seconds_per_worker"]]
        return out
