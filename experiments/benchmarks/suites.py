"""``--suite gpu``: the fixed GPU check, and its 2-process DDP row.

On a GPU: Barlow Twins ResNet-50 (channels_last) and ViT-S/16 at 224 px, batch 256, bf16, projector
8192-8192-8192, each with a synthetic-batch row (``model``) and a real-pipeline row (``pipeline``: the run's
loaders with workers over generated JPEGs of VOC's size); DINO ViT-S/16 (2 x 224 + 6 x 96 crops, out 65536);
the E1 (DeepLabV3 on the dilated ResNet-50) and E2 (SETR-PUP on ViT-S/16) steps and a linear head at 512 px;
E2 fed by paper.yaml's mmseg loader (``--seg-pipeline mmseg``: worker regions, crops made on the device);
with 2 GPUs a 2-process DDP Barlow Twins check (`ddp_check`). Without a GPU the same rows run tiny on the
CPU (resnet_tiny / vit_nano_patch8, 64 px, one step, DDP on gloo). Every row is `BenchSettings` run through
`run.run_bench`, i.e. run configs built by name (methods, evaluation presets).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from core.errors import ConfigError
from experiments.benchmarks.measure import BenchReport, BenchRow, sync
from experiments.benchmarks.run import run_bench
from experiments.benchmarks.settings import BenchSettings

#: the GPU suite's rows: (label, what it measures). Sizes on a GPU / in the tiny CPU fallback in `suite_plan`.
SUITE_ITEMS = (
    ("bt-r50", "Barlow Twins ResNet-50, channels_last, 8192-8192-8192 projector, LARS"),
    ("bt-vits16", "Barlow Twins ViT-S/16 (fused attention), 8192-8192-8192 projector, LARS"),
    ("dino-vits16", "DINO ViT-S/16, 2 global + 6 local crops (paper.yaml), out 65536, AdamW"),
    ("e1-deeplabv3-r50", "E1: DeepLabV3 on a dilated ResNet-50 (output stride 8), crop 512"),
    ("e2-setr-vits16", "E2: SETR-PUP on ViT-S/16, crop 512"),
    ("e2-linear-vits16", "linear head on ViT-S/16, crop 512"),
    ("e2-setr-vits16-mmseg", "E2 with paper.yaml's mmseg loader (pipeline mode: worker regions, device crops), crop 512"),
)
DDP_ITEM = "ddp-2"


def suite_voc_root(n_train: int, sizes: Sequence[tuple[int, int]]) -> Path:
    """Generated JPEGs of VOC's sizes (500x375 and 375x500 on a GPU), created once and cached next to the
    project's other generated data (`core.data.synthetic.data_cache_dir`)."""
    from core.data.synthetic import data_cache_dir, generate_voc

    tag = "-".join(f"{w}x{h}" for w, h in sizes)
    return generate_voc(data_cache_dir() / f"bench-voc-{n_train}-{tag}", n_train=n_train, n_val=4, size=64,
                        seed=0, sizes=list(sizes))


def _sizes(gpu: bool, common: dict) -> tuple[dict, dict, dict, str, str]:
    """(Barlow Twins, DINO, segmentation) settings and the (CNN, ViT) backbones: paper sizes or tiny CPU ones."""
    if gpu:
        bt = dict(common, image_size=224, batch_size=256, projector=(8192, 8192, 8192))
        dino = dict(common, image_size=224, batch_size=128, dino_local_crops=6, dino_out_dim=65536)
        return bt, dino, dict(common, image_size=512, batch_size=16), "resnet50", "vit_small_patch16"
    bt = dict(common, image_size=64, batch_size=4, projector=(64, 64, 64))
    dino = dict(common, image_size=64, batch_size=4, dino_local_crops=2, dino_out_dim=64)
    return bt, dino, dict(common, image_size=64, batch_size=2), "resnet_tiny", "vit_nano_patch8"


def suite_plan(gpu: bool, workers: int, data_root: Optional[str] = None, seed: int = 0, compile_: bool = False,
               threads: Optional[int] = None, generate: bool = True) -> list[tuple[str, BenchSettings]]:
    """The suite: on a GPU the paper's sizes (224 px, batch 256, bf16, real pipeline on VOC-size JPEGs and
    a synthetic-batch row; crop 512 for E1 / E2); without a GPU a tiny CPU version of the same rows (small
    backbones, 64 px, one step) that exercises the same code paths."""
    steps = dict(warmup=5, iters=10, repeats=3) if gpu else dict(warmup=1, iters=1, repeats=1)
    common = dict(steps, precision="bf16" if gpu else "32", device="cuda" if gpu else "cpu", lightly=False,
                  seed=seed, compile=compile_ and gpu, threads=threads, channels_last=True, workers=workers)
    bt, dino, seg, cnn, vit = _sizes(gpu, common)
    if data_root is None and generate:  # the pipeline rows read JPEGs of VOC's size (tiny ones on the CPU)
        sizes = ((500, 375), (375, 500)) if gpu else ((80, 60), (60, 80))
        data_root = str(suite_voc_root(max(16, 2 * int(bt["batch_size"])), sizes))
    bt.update(tasks=("barlow_twins",), modes=("model", "pipeline"), data_root=data_root)
    seg.update(tasks=("segment",), modes=("model",))
    return [
        ("bt-r50", BenchSettings(backbones=(cnn,), **bt)),
        ("bt-vits16", BenchSettings(backbones=(vit,), **bt)),
        ("dino-vits16", BenchSettings(backbones=(vit,), tasks=("dino",), modes=("model",), **dino)),
        ("e1-deeplabv3-r50", BenchSettings(backbones=(cnn,), evaluations=("E1",), seg_head="deeplabv3", **seg)),
        ("e2-setr-vits16", BenchSettings(backbones=(vit,), evaluations=("E2",), seg_head="setr_pup", **seg)),
        ("e2-linear-vits16", BenchSettings(backbones=(vit,), seg_head="linear", **seg)),
        ("e2-setr-vits16-mmseg", BenchSettings(backbones=(vit,), evaluations=("E2",), seg_head="setr_pup",
                                               seg_pipeline="mmseg",
                                               **{**seg, "modes": ("pipeline",), "data_root": data_root})),
    ]


def suite_rows(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """--rows: names of `SUITE_ITEMS` (and ddp-2); ConfigError naming an unknown one."""
    if text is None:
        return None
    names = tuple(v for v in str(text).split(",") if v)
    known = [k for k, _ in SUITE_ITEMS] + [DDP_ITEM]
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
    rep = BenchReport.new(torch.device("cuda" if gpu else "cpu"), command,
                          {"suite": "gpu" if gpu else "gpu (CPU fallback)", "rows": {k: asdict(v) for k, v in plan}})
    for label, s in plan:
        say(f"suite {label} ...")
        part = run_bench(s, command, log=say)
        for row in part.rows:
            row.suite_item = label
        rep.add(part.rows)
    n_gpu = torch.cuda.device_count() if gpu else 0
    if rows is not None and DDP_ITEM not in rows:
        ddp = False
    if ddp if ddp is not None else n_gpu >= 2:
        say(f"suite {DDP_ITEM} ...")
        rep.add([ddp_check(suite_plan(gpu, workers, data_root, seed, False, threads, generate=False)[0][1], gpu)])
    elif gpu:
        rep.skipped.append(f"{DDP_ITEM}: {n_gpu} GPU visible; the 2-process DDP check needs 2")
    return rep


# -- the 2-process DDP check: Barlow Twins' step as the official repo distributes it (one forward of both
# views through DistributedDataParallel, embeddings all-gathered with gradients in the loss, NCCL on GPUs,
# gloo on the CPU), batch per rank = the suite's, img/s of both ranks together
class _Pair(torch.nn.Module):
    """Official Barlow Twins: both views in one forward, the method's own loss."""

    def __init__(self, method):
        super().__init__()
        self.m = method

    def forward(self, x1, x2):
        return self.m.loss_fn(self.m(x1), self.m(x2))


def _ddp_model(s: BenchSettings, device: torch.device, gpu: bool, rank: int):
    from core.runs.pretrain import build_method
    from experiments.benchmarks.rows import pretrain_config

    cfg = pretrain_config(s, "barlow_twins", s.backbones[0])
    torch.manual_seed(cfg.seed)
    method = build_method(cfg).to(device)
    if gpu:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model = torch.nn.parallel.DistributedDataParallel(_Pair(method), device_ids=[rank] if gpu else None)
    return method, model


def _ddp_worker(rank: int, world: int, s: BenchSettings, gpu: bool, port: int, out: str) -> None:
    import torch.distributed as dist

    from experiments.benchmarks.runners import autocast

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if gpu else torch.device("cpu")
        if gpu:
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        if s.threads:
            torch.set_num_threads(int(s.threads))
        method, model = _ddp_model(s, device, gpu, rank)
        opt = method.configure_optimizers()["optimizer"]
        g = torch.Generator().manual_seed(s.seed + rank)
        x1, x2 = (torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=g).to(device) for _ in range(2))
        if method.channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))

        def step():
            with autocast(device, s.precision):
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
    from experiments.benchmarks.rows import pretrain_config

    total = world * s.batch_size
    cfg = pretrain_config(s, "barlow_twins", s.backbones[0])
    return BenchRow(task="barlow_twins", impl="twinseg-ddp", mode="model", backbone=cfg.backbone,
                    image_size=s.image_size, batch_size=total, precision=s.precision,
                    device=f"{world}x {'cuda' if gpu else 'cpu'}", channels_last=s.channels_last, compile=False,
                    img_per_s=total / res["step_s"], step_ms=res["step_s"] * 1e3, best_step_ms=res["best_s"] * 1e3,
                    cpu_ms=0.0, peak_mem_mb=0.0, mem_kind="-", data_wait_frac=None, loss=res["loss"], iters=s.iters,
                    repeats=s.repeats, detail=f"{world} processes x batch {s.batch_size}, DDP "
                                                 f"({'NCCL' if gpu else 'gloo'}), embeddings all-gathered",
                    suite_item=f"ddp-{world}", stage="pretrain", config=cfg.to_dict())
