"""FLOPs of one training image and model FLOPs utilisation (MFU).

`flops_per_image` (metrics.json, both stages) = the FLOPs of the forward AND backward pass of the
run's real LightningModule `training_step` for ONE training image with all its views (whatever the
method's views are: e.g. 2 for Barlow Twins, 2 global crops through student and teacher + N local crops
through the student for DINO; segmentation: one image + its mask), at the run's real input sizes. It is counted once, at
run start, by `torch.utils.flop_counter.FlopCounterMode` on a batch of 2 real training samples
(dataset items 0 and 1 through the train loader's collate function; 2 because BatchNorm and the
methods' batch statistics (e.g. Barlow Twins' cross-correlation) need more than one sample), divided by 2.

How torch counts (torch/utils/flop_counter.py): only matrix products and convolutions (mm, addmm,
bmm, baddbmm, convolution and its backward, scaled-dot-product / flash / efficient attention and their
backward); one multiply-add (FMA) = 2 FLOPs; a Linear(a, b) forward = 2ab per sample (the bias add is
not counted), its backward 2 x that (input gradient + weight gradient; the weight gradient alone when
the input needs no gradient, e.g. the first layer); a Conv2d forward = 2 Cin Cout k^2 Hout Wout per
image (groups divide it); attention backward = 2.5 x forward (FlashAttention's recomputation).
Elementwise ops, normalisation, softmax, the loss' reductions, data augmentation and the optimiser
step are not counted: this is the "model FLOPs" of MFU (Chowdhery et al., PaLM, 2022, appendix B),
so MFU does not reward recomputation.

The count runs before `trainer.fit` (the module not yet wrapped in DDP), on the run's device (the
module is moved back to the CPU afterwards, where Lightning expects it), in fp32 (a FLOP count does not depend on the dtype), with: the RNG states (torch, numpy,
random) restored afterwards, the module's buffers (BatchNorm statistics, DINO's centre) restored,
gradients cleared, `self.log` silenced, the GPU batch augmentation and `torch.compile` bypassed, and
`torch.distributed` seen as uninitialised (no collective call; under DDP the count is that of one
process' own computation: the all-gathered Barlow Twins cross-correlation is counted over the local
batch). The training run is therefore unchanged by the count (seeded results stay identical).

`mfu(flops_per_image, images_per_s, device_name, n_devices)` = achieved FLOP/s (flops_per_image x
images/s) / (the device's dense bf16 peak x devices); None on the CPU and on a GPU not in
`PEAK_BF16_TFLOPS`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

from core.errors import TwinsegError
from core.rng import preserved_rng

#: Dense (no 2:4 sparsity) bf16 Tensor Core peak in TFLOP/s per GPU, from NVIDIA's datasheets, which
#: print the sparse figure (marked "*With sparsity"): the dense peak is half of it.
#: - H100 SXM5 and H200 SXM: "BF16 Tensor Core 1,979 teraFLOPS*" -> 989.4
#:   (NVIDIA H100 Tensor Core GPU datasheet, nvidia.com/en-us/data-center/h100/; H200 datasheet,
#:   nvidia.com/en-us/data-center/h200/; the H100 whitepaper's table gives 989.4 dense at 1830 MHz);
#: - H100 PCIe: 1,513* -> 756 (same H100 datasheet); H100 NVL / H200 NVL: 1,671* -> 835.5 (datasheets);
#: - A100 (SXM4 and PCIe, 40/80 GB): "BF16 Tensor Core 312 TFLOPS | 624 TFLOPS*" -> 312 (A100 datasheet);
#: - L40S: "BF16 Tensor Core 362.05 | 733 TFLOPS*" -> 362 (L40S datasheet);
#: - L4: "BF16 Tensor Core 242 teraFLOPS*" -> 121 (L4 datasheet);
#: - GeForce RTX 4090: "Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2 / 330.4*" -> 165.2
#:   (NVIDIA Ada GPU architecture whitepaper, appendix table; torch's bf16 matmuls accumulate in fp32).
#: Matched against `torch.cuda.get_device_name()` in this order (first match wins; e.g.
#: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one, "NVIDIA GH200 480GB" an H200-class die).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H[12]00.*NVL", 835.5),
    (r"H100", 989.4),
    (r"H200", 989.4),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.2),
)


def peak_bf16_flops(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one GPU named `device_name` (torch.cuda.get_device_name()), or None
    when the name is not in `PEAK_BF16_TFLOPS` (MFU is then unknown, not guessed)."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops * 1e12
    return None


def mfu(flops_per_image: Optional[float], images_per_s: Optional[float], device_name: Optional[str],
        n_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: flops_per_image x images_per_s / (peak x n_devices), a fraction in
    [0, 1]; None on the CPU (`device_name` None or "cpu"), on an unknown GPU, or without a FLOP count."""
    peak = peak_bf16_flops(device_name) if device_name and device_name != "cpu" else None
    if peak is None or not flops_per_image or not images_per_s or n_devices < 1:
        return None
    return float(flops_per_image) * float(images_per_s) / (peak * int(n_devices))


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs torch's FlopCounterMode counts while `fn()` runs (FMA = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- the run's module
@contextlib.contextmanager
def _no_distributed() -> Iterator[None]:
    """`torch.distributed.is_initialized()` reads False inside (no collective call from the losses)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    real = dist.is_initialized
    dist.is_initialized = lambda: False  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.is_initialized = real  # type: ignore[assignment]


@contextlib.contextmanager
def _counting_view(module) -> Iterator[None]:
    """The module as the count sees it: `self.log` silenced, no GPU batch augmentation (data, not
    model FLOPs), the eager (uncompiled) forward; everything restored afterwards."""
    saved: dict[str, Any] = {}
    for name, value in (("_gpu_aug", ()), ("_compiled", None)):
        if name in module.__dict__:
            saved[name] = module.__dict__[name]
            module.__dict__[name] = value
    if getattr(getattr(module, "cfg", None), "compile", False) and "_compiled" in saved:
        module.__dict__["_compiled"] = (module.backbone,)  # SSLMethod.encoder(): the eager backbone
    if "_train_forward" in module.__dict__:  # SegmentationMethod: the (maybe compiled) training forward
        saved["_train_forward"] = module.__dict__["_train_forward"]
        module.__dict__["_train_forward"] = module.model
    module.__dict__["log"] = lambda *a, **k: None
    try:
        yield
    finally:
        del module.__dict__["log"]
        module.__dict__.update(saved)


def sample_batch(loader, n: int = 2):
    """`n` real training samples (dataset items 0..n-1, the train transform applied) collated as the
    loader collates them; RNG states are left as they were (the sampler and workers never run)."""
    ds = loader.dataset
    if len(ds) < n:
        raise ValueError(f"the training set has {len(ds)} images; counting FLOPs needs {n}")
    collate = loader.collate_fn or torch.utils.data.default_collate
    with preserved_rng():
        return collate([ds[i] for i in range(n)])


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def training_flops_per_image(module, batch, n_images: int) -> int:
    """FLOPs of forward + backward of `module.training_step(batch, 0)` divided by `n_images` (the
    images in `batch`), on the module's current device; the module's state is left as it was."""
    device = next(module.parameters()).device
    batch = _to(batch, device)
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    grads = [(p, p.grad) for p in module.parameters()]
    module.train()  # as Lightning fits it (a module's own train() keeps e.g. a frozen backbone in eval)

    def step() -> None:
        loss = module.training_step(batch, 0)
        if isinstance(loss, dict):
            loss = loss["loss"]
        loss.backward()

    try:
        with preserved_rng(device), _no_distributed(), _counting_view(module), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total = count_flops(step)
    finally:
        with torch.no_grad():
            for b, old in buffers:
                b.copy_(old)
        for p, g in grads:
            p.grad = g
        for m, mode in modes:  # every submodule's own mode back (not module.train(flag) on all)
            m.training = mode
    return int(round(total / max(int(n_images), 1)))


def run_flops_per_image(module, loader, device=None, n: int = 2) -> Optional[int]:
    """`training_flops_per_image` of the run's module on `n` real samples of its train `loader`, on
    `device` (None: where the module is; the module is moved back afterwards); None (with a
    RuntimeWarning saying why) when it cannot be counted, so the run itself never fails on it."""
    home = next(module.parameters()).device
    try:
        if device is not None:
            module.to(device)
        return training_flops_per_image(module, sample_batch(loader, n), n)
    except TwinsegError:  # bad data found while sampling: the run's own one-line error, not a warning
        raise
    except Exception as e:  # noqa: BLE001 - a missing FLOP count must not fail a training run
        warnings.warn(f"flops_per_image not counted ({type(e).__name__}: {e}); metrics.json gets null and mfu null",
                      RuntimeWarning, stacklevel=2)
        return None
    finally:
        module.to(home)
