"""Compute accounting for every run: wall time, device-seconds, images/s, peak memory.

Definitions (so Barlow Twins and DINO compare at equal budget):
- `wall_time_s`: seconds spent inside `trainer.fit` (training + validation), summed over resumptions.
- `device_seconds`: on GPU, wall time x number of GPUs; on CPU, the process' CPU time (user + sys),
  i.e. core-seconds actually consumed.
- `images_per_s`: training images (not views) processed per second of training-loop time.
- `peak_mem_mb`: peak GPU memory allocated (torch.cuda.max_memory_allocated) on GPU; peak resident
  set size of the process on CPU.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch
from lightning.pytorch import Callback


def _cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _batch_size(batch: Any) -> int:
    """Number of images in a batch: the first tensor's leading dim (views share it)."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return int(batch.shape[0]) if hasattr(batch, "shape") else 0


class AccountingCallback(Callback):
    """Measures the run's compute; state survives checkpoint/resume."""

    def __init__(self) -> None:
        self.state = {"wall_time_s": 0.0, "train_time_s": 0.0, "cpu_seconds": 0.0, "images": 0, "peak_mem_mb": 0.0}
        self._t0 = self._cpu0 = self._e0 = 0.0
        self._device = "cpu"
        self._n_devices = 1

    # -- fit span
    def on_fit_start(self, trainer, pl_module) -> None:
        self._device = pl_module.device.type
        self._n_devices = max(1, int(trainer.num_devices))
        if self._device == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0, self._cpu0 = time.perf_counter(), _cpu_time()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state["wall_time_s"] += time.perf_counter() - self._t0
        self.state["cpu_seconds"] += _cpu_time() - self._cpu0
        self._update_peak(pl_module)

    # -- training-loop time and images
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._e0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._device == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.state["train_time_s"] += time.perf_counter() - self._e0
        self._update_peak(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.state["images"] += _batch_size(batch) * self._n_devices

    def _update_peak(self, pl_module) -> None:
        if self._device == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = _peak_rss_mb()
        self.state["peak_mem_mb"] = max(self.state["peak_mem_mb"], peak)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.update(state_dict)

    def summary(self) -> dict:
        s = self.state
        gpu = self._device == "cuda"
        name = torch.cuda.get_device_name() if gpu else "cpu"
        return {
            "wall_time_s": round(s["wall_time_s"], 3),
            "device_seconds": round(s["wall_time_s"] * self._n_devices if gpu else s["cpu_seconds"], 3),
            "device": f"{self._n_devices}x {name}" if gpu else f"cpu ({os.cpu_count()} cores)",
            "images_per_s": round(s["images"] / s["train_time_s"], 2) if s["train_time_s"] > 0 else 0.0,
            "train_images": int(s["images"]),
            "peak_mem_mb": round(s["peak_mem_mb"], 1),
        }
