"""Pre-start checks, before Ray starts or anything is written: the grid's own per-trial problems
(experiments/engine/expand.py), wandb, the given data folders (layout only; the stages' declarations say
what each trains on: `core.data.module.validate_data`), missing weight files offline, `checkpoint:PATH`
sources, and whether each trial fits the cluster (this machine for a local start). EVERY problem is one
`<file>: <where>: <problem>; <fix>` line; `report_problems` prints them and gives the exit status."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.config import check_wandb
from core.errors import ConfigError, TwinsegError
from core.stages import get_stage
from experiments.engine.console import Console, fmt
from experiments.engine.gridfile import data_root_fix, data_root_key
from experiments.engine.ray_ddp import DRIVER_CPU
from experiments.engine.spec import GridSpec, Problem, source_dependency


# ============================================================================ cluster fit
def trial_needs(resources: dict) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds at once: its resources, or for a Ray Train trial (workers N > 1)
    N x the per-worker resources plus the driver's DRIVER_CPU."""
    n = int(resources.get("workers", 1))
    if n > 1:
        return n * float(resources["cpu"]) + DRIVER_CPU, n * float(resources["gpu"])
    return float(resources["cpu"]), float(resources["gpu"])


def cluster_fit_problem(spec: GridSpec, cpus: float, gpus: float) -> Optional[str]:
    """The first of `cluster_fit_problems`, or None."""
    found = cluster_fit_problems(spec, cpus, gpus)
    return found[0] if found else None


def cluster_fit_problems(spec: GridSpec, cpus: float, gpus: float,
                         cluster: str = "the Ray cluster") -> list[str]:
    """Why trials can never start on a cluster of `cpus` / `gpus` (one line each, no file prefix;
    GPUs before CPUs). Trials with the same needs are reported once. `cluster`: how the lines name
    the cluster."""
    out: list[str] = []
    seen: set[tuple] = set()
    for t in spec.trials:
        key = get_stage(t.stage).grid_key
        r = t.resources
        sig = (key, r["cpu"], r["gpu"], int(r.get("workers", 1)))
        if sig in seen:
            continue
        seen.add(sig)
        n = sig[3]
        need_cpu, need_gpu = trial_needs(r)
        if n > 1:
            if need_gpu > gpus:
                out.append(f"{key}: trial {t.id} runs devices={n} workers x {key}.resources.gpu={fmt(r['gpu'])} = "
                           f"{fmt(need_gpu)} GPU(s) but {cluster} has {fmt(gpus)}; lower settings.devices "
                           "for it or run on a machine / cluster with more GPUs")
            if need_cpu > cpus:
                out.append(f"{key}: trial {t.id} runs devices={n} workers x {key}.resources.cpu={fmt(r['cpu'])} "
                           f"(+{fmt(DRIVER_CPU)} for its driver) = {fmt(need_cpu)} CPU(s) but {cluster} has "
                           f"{fmt(cpus)}; lower {key}.resources.cpu or settings.devices, or add CPUs (--num-cpus)")
            continue
        if need_gpu > gpus:
            out.append(f"{key}.resources.gpu={fmt(r['gpu'])} but {cluster} has {fmt(gpus)} GPU(s); "
                       "use --grid smoke (CPU) or run on a GPU machine / cluster")
        if need_cpu > cpus:
            out.append(f"{key}.resources.cpu={fmt(r['cpu'])} but {cluster} has {fmt(cpus)} CPU(s); "
                       f"lower {key}.resources.cpu or add CPUs (--num-cpus)")
    return out


def available_cpus() -> int:
    """CPUs this process may use (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_gpu_count() -> int:
    """GPUs torch sees here (CUDA_VISIBLE_DEVICES applies); 0 when torch or CUDA is missing. torch
    is loaded anyway by the grid's model checks; no CUDA context is created."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no driver, broken install: no GPU for the check
        return 0


@dataclass
class ClusterSize:
    cpus: float
    gpus: float
    name: str  # how a problem line names it ("... but <name> has 0 GPU(s)")
    text: str  # the plan's description (how it was counted)


def local_cluster(args) -> Optional[ClusterSize]:
    """The cluster a local start gets (this machine; --num-cpus replaces the CPU count), or None
    with --address (known only once Ray is up)."""
    if args.address:
        return None
    gpus = local_gpu_count()
    if args.num_cpus is not None:
        cpus, how = args.num_cpus, "--num-cpus"
    else:
        cpus, how = available_cpus(), "the CPUs this process may use"
    return ClusterSize(float(cpus), float(gpus), "this machine (local start)",
                       f"this machine (local start): {cpus} CPU(s) ({how}), {gpus} GPU(s) (torch.cuda.device_count)")


# ============================================================================ data, weights, checkpoints
def _data_groups(spec: GridSpec) -> dict[str, tuple[str, dict, list[str], str]]:
    """Distinct (stage, data section, segmentation train split) of the trials -> (stage, data, trial ids,
    train split)."""
    groups: dict[str, tuple[str, dict, list[str], str]] = {}
    for t in spec.trials:
        d = t.config.get("data") or {}
        split = str(t.config.get("train_split", "train"))
        key = json.dumps([t.stage, d, split], sort_keys=True)
        groups.setdefault(key, (t.stage, d, [], split))[2].append(t.id)
    return groups


def data_problems(spec: GridSpec) -> list[Problem]:
    """Given dataset folders (data.root) must exist and have the layout, split lists and listed
    files (no pixels read, nothing written): a wrong layout is reported here, once, before any
    trial starts, instead of failing every trial. Generated datasets (root null) are made at the start."""
    from core.config import DataConfig

    out: list[Problem] = []
    for stage, d, ids, split in _data_groups(spec).values():
        root = d.get("root")
        if root is None:
            continue
        key = data_root_key(spec.raw, str(d.get("dataset", "voc")))
        if not Path(root).exists():
            what = f"does not exist; {data_root_fix(key, str(d.get('dataset', 'voc')))}"
        else:
            from core.data.module import validate_data

            try:
                validate_data(DataConfig.from_dict(d), stage, train_split=split)
                continue
            except TwinsegError as e:
                what = " ".join(str(e).split())
        _add_problem(out, Problem(spec.path.name, f"{key}={root}", what, list(ids)))
    return out


def prepare_data(spec: GridSpec, console: Console) -> None:
    """Generate the synthetic dataset ONCE, before trials start (so that concurrent trials never
    race to generate it). Given folders were checked by `data_problems`."""
    from core.config import DataConfig

    for _stage, d, _ids, _split in _data_groups(spec).values():
        if d.get("root") is not None:
            continue
        try:
            from core.data.synthetic import default_coco_root, default_voc_root
        except ImportError:
            continue  # the runs generate it themselves
        make = default_coco_root if d.get("dataset") == "coco_stuff" else default_voc_root
        path = make(DataConfig.from_dict(d))
        console.line(f"data     generated dataset ready at {path}", "dim")


def weight_problems(spec: GridSpec, weights_dir=None, online: Optional[bool] = None) -> list[Problem]:
    """Named weight sources (imagenet, dino, ...) must be in the weights folder when offline: one
    problem per missing file (path, URL, pre-fetch command, the trials that need it), all of them
    at once. Online, the trials download what is missing. (A pair without any weights is a grid
    problem: validate.weights_refusal.)"""
    from core.errors import WeightsError
    from core.weights import WEIGHT_SPECS, _resolve, is_online

    if is_online(online):
        return []
    needs: dict[tuple[str, str], list[str]] = {}
    for t in spec.trials:
        key = (str(t.config.get("source", "random")), str(t.config.get("backbone", "")))
        if key in WEIGHT_SPECS:
            needs.setdefault(key, []).append(t.id)
    out: list[Problem] = []
    for (source, backbone), ids in needs.items():
        try:  # offline: the file is there, or the weights module's own one-line error says how to get it
            _resolve(WEIGHT_SPECS[(source, backbone)], weights_dir, False)
        except WeightsError as e:
            out.append(Problem(spec.path.name, f"source={source} backbone={backbone}", str(e), ids))
    return out


def checkpoint_problems(spec: GridSpec) -> list[Problem]:
    """A `checkpoint:PATH` source the grid does not produce itself must be an existing FILE (a folder
    or a missing path would fail every attempt of the trial): one problem per path. The grid's own are
    the trial's dependency's artifact (spec.py `source_dependency`), made by the time the trial starts."""
    out: list[Problem] = []
    for t in spec.trials:
        src = str(t.config.get("source", ""))
        dep = source_dependency(src)
        if not src.startswith("checkpoint:") or (dep is not None and dep[0] in t.depends_on):
            continue
        path = Path(src[len("checkpoint:"):].strip()).expanduser()
        if path.is_dir():
            what = (f"is a folder, not a weights file; point checkpoint: at the file inside it (e.g. "
                    f"{path / 'backbone.pt'})")
        elif not path.exists():
            what = "does not exist; check the path (a run folder's backbone.pt, or a .pth / .safetensors file)"
        else:
            continue
        _add_problem(out, Problem(spec.path.name, f"source=checkpoint:{path}", what, [t.id]))
    return out


def _add_problem(out: list[Problem], pr: Problem) -> None:
    """Append `pr`, or add its trials to an earlier problem with the same place and message."""
    for q in out:
        if (q.fname, q.where, q.what) == (pr.fname, pr.where, pr.what):
            q.trials += [t for t in pr.trials if t not in q.trials]
            return
    out.append(pr)


# ============================================================================ all of them
def pre_start_problems(spec: GridSpec, cluster: Optional[ClusterSize]) -> list[str]:
    """Every problem found before the start, one line each (`<file>: <where>: <problem>; <fix>`):
    the grid's per-trial problems, wandb, data folders, missing weight files, cluster fit."""
    lines = [p.line for p in spec.problems]
    try:
        check_wandb(spec.wandb)
    except ConfigError as e:
        lines.append(str(e))
    lines += [p.line for p in data_problems(spec)]
    lines += [p.line for p in weight_problems(spec)]
    lines += [p.line for p in checkpoint_problems(spec)]
    if cluster is not None:
        lines += [f"{spec.path.name}: {m}" for m in cluster_fit_problems(spec, cluster.cpus, cluster.gpus, cluster.name)]
    return [" ".join(ln.split()) for ln in lines]


def report_problems(lines: list[str]) -> int:
    """Each problem as one `twinseg: error:` line on stderr; the exit status (0 none, 2 some)."""
    for ln in lines:
        print(f"twinseg: error: {ln}", file=sys.stderr)
    sys.stderr.flush()
    return 2 if lines else 0
