"""Compute accounting for every run: wall time, device-seconds, images/s, peak memory.

Definitions (so Barlow Twins and DINO compare at equal budget):
- `wall_time_s`: seconds spent inside `trainer.fit` (training + validation), summed over resumptions.
- `device_seconds`: on GPU, wall time x number of GPUs; on CPU, the process' CPU time (user + sys),
  i.e. core-seconds actually consumed. Under DDP (`trainer.world_size` > 1, e.g. a grid trial on
  several GPUs through Ray Train) every rank counts: GPU wall time x world size; on CPU the CPU
  time summed over the ranks (each rank's in `device_seconds_per_worker`, with `workers`).
- `images_per_s`: training images (not views) processed per second of training-loop time, all
  ranks together (a rank's batch x world size per step).
- `peak_mem_mb`: peak GPU memory allocated (torch.cuda.max_memory_allocated) on GPU; peak resident
  set size of the process on CPU (rank 0's under DDP).
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
        if self._device == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0, self._cpu0 = time.perf_counter(), _cpu_time()

    def on_fit_end(self, trainer, pl_module) -> None:
        wall, cpu = time.perf_counter() - self._t0, _cpu_time() - self._cpu0
        self.state["wall_time_s"] += wall
        if self._n_devices > 1:
            # every rank runs on_fit_end: one all_gather (same call on all ranks) of each rank's time
            per = self._gather(trainer, [wall, cpu])
            own = per[:, 1] if self._device == "cpu" else per[:, 0]
            old = self.state.get("device_seconds_per_worker") or [0.0] * len(own)
            if len(old) != len(own):  # resumed with another world size: restart the per-rank split
                old = [sum(old) / len(own)] * len(own)
            self.state["device_seconds_per_worker"] = [a + float(b) for a, b in zip(old, own)]
            self.state["cpu_seconds"] += float(per[:, 1].sum())
        else:
            self.state["cpu_seconds"] += cpu
        self._update_peak(pl_module)

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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.state["images"] += _batch_size(batch) * self._n_devices

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
        s = self.state
        gpu = self._device == "cuda"
        name = torch.cuda.get_device_name() if gpu else "cpu"
        out = {
            "wall_time_s": round(s["wall_time_s"], 3),
            "device_seconds": round(s["wall_time_s"] * self._n_devices if gpu else s["cpu_seconds"], 3),
            "device": f"{self._n_devices}x {name}" if gpu else f"cpu ({os.cpu_count()} cores)",
            "images_per_s": round(s["images"] / s["train_time_s"], 2) if s["train_time_s"] > 0 else 0.0,
            "train_images": int(s["images"]),
            "peak_mem_mb": round(s["peak_mem_mb"], 1),
        }
        if self._n_devices > 1 and "device_seconds_per_worker" in s:  # DDP across processes (all ranks counted)
            if not gpu:
                out["device"] = f"{self._n_devices}x cpu ({os.cpu_count()} cores)"
            out["workers"] = self._n_devices
            out["device_seconds_per_worker"] = [round(v, 3) for v in s["device_seconds_per_worker"]]
        return out
