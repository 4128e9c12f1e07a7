"""`run_bench(settings)`: every row of the settings (`rows.plan`) timed (`measure.time_case`), in one report,
with Barlow Twins' twinseg / lightly img/s ratios and the two losses compared on the same embeddings."""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Optional

import torch

from experiments.benchmarks.measure import BenchReport, BenchRow, resolve_device, time_case
from experiments.benchmarks.rows import check_case, plan
from experiments.benchmarks.settings import LAMBD, BenchSettings


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


def lightly_ratio(rows: list[BenchRow]) -> Optional[dict]:
    """twinseg / lightly img/s of one Barlow Twins row (None without a lightly runner)."""
    tw = next((r for r in rows if r.impl == "twinseg"), None)
    lt = next((r for r in rows if r.impl == "lightly"), None)
    if tw is None or lt is None:
        return None
    return {"backbone": tw.backbone, "mode": tw.mode, "twinseg_img_s": tw.img_per_s, "lightly_img_s": lt.img_per_s,
            "ratio": tw.img_per_s / lt.img_per_s, "ratio_best": lt.best_step_ms / tw.best_step_ms,
            "ratio_cpu": lt.cpu_ms / tw.cpu_ms if tw.cpu_ms > 0 else None}


def prepare_device(s: BenchSettings) -> torch.device:
    if s.threads:
        torch.set_num_threads(int(s.threads))
    device = resolve_device(s.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def run_bench(s: BenchSettings, command: str = "python experiments/bench.py",
              log: Optional[Callable[[str], None]] = None) -> BenchReport:
    """Validate `s`, build and check every row's config (one-line errors before any timing), time each row,
    return the report (rows, ratios, loss checks)."""
    s.validate()
    cases = plan(s)
    for case in cases:
        check_case(case)
    device = prepare_device(s)
    rep = BenchReport.new(device, command, asdict(s))
    say = log or (lambda m: None)
    for case in cases:
        say(f"{case.task}{' ' + case.evaluation if case.evaluation else ''} / {case.config.backbone} / {case.mode} ...")
        rows = time_case(case, s, device)
        rep.add(rows)
        ratio = lightly_ratio(rows)
        if ratio is not None:
            rep.ratios.append(ratio)
    if s.lightly and any(c.task == "barlow_twins" for c in cases):
        rep.loss_checks.append(compare_bt_losses(s.batch_size, int(s.projector[-1]), s.seed))
    return rep
