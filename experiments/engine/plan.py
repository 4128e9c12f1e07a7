"""The plan of a dry run (`--dry-run`): the grid, the assumed cluster, the data and weights, one line per
trial (id, stage, dependency, resources; `!` marks a trial named by a problem) and the totals per stage; or,
with `--json`, the trials and the problems as one JSON document (`plan_json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from core.stages import stages
from experiments.engine.checks import ClusterSize, trial_needs
from experiments.engine.console import fmt
from experiments.engine.ray_ddp import DRIVER_CPU
from experiments.engine.spec import GridSpec, describe


def _res_text(r: dict) -> str:
    n = int(r.get("workers", 1))
    base = f"{fmt(r['cpu'])} CPU, {fmt(r['gpu'])} GPU"
    return f"{n} workers x ({base}) + {fmt(DRIVER_CPU)} CPU driver" if n > 1 else base


def plan_text(spec: GridSpec, cluster: Optional[ClusterSize], results_dir: Optional[Path],
              resuming: bool = False, address: Optional[str] = None) -> str:
    """The plan of a dry run: the grid, the assumed cluster, the data and weights, one line per
    trial (id, stage, dependency, resources; `!` marks a trial named by a problem) and the totals."""
    from core.weights import default_weights_dir, is_online

    flagged = {tid for p in spec.problems for tid in p.trials}
    out = [f"plan     {describe(spec)}; at most {spec.max_concurrent} at once, "
           f"{spec.retries} retr{'y' if spec.retries == 1 else 'ies'} per trial"]
    if cluster is not None:
        out.append(f"cluster  assumed: {cluster.text}")
    else:
        out.append(f"cluster  --address {address}: its size is known only once Ray is up, so the fit is checked at "
                   "the start (not by this dry run)")
    roots = sorted({str((t.config.get("data") or {}).get("root")) for t in spec.trials})
    data = ", ".join("generated dataset (made at the start, under data/)" if r == "None" else f"{r} (layout checked)"
                     for r in roots)
    out.append(f"data     {data}")
    wdir = default_weights_dir()
    out.append(f"weights  {wdir} " + ("(online: the trials download missing files)" if is_online()
                                      else "(offline: every file must be there before the start)"))
    if results_dir is not None:
        out.append(f"results  {results_dir} ({'resuming; ' if resuming else ''}not written by a dry run)")
    out.append("")
    wid = max([len(t.id) for t in spec.trials] + [2])
    dw = max([len(", ".join(t.depends_on) or "-") for t in spec.trials] + [10])
    out.append(f"  {'id':<{wid}}  {'stage':<8}  {'depends on':<{dw}}  resources")
    for t in spec.trials:
        mark = "!" if t.id in flagged else " "
        dep = ", ".join(t.depends_on) or "-"
        out.append(f"{mark} {t.id:<{wid}}  {t.stage:<8}  {dep:<{dw}}  {_res_text(t.resources)}")
    out.append("")
    for stage in stages():
        ts = spec.stage(stage)
        if not ts:
            continue
        needs = [trial_needs(t.resources) for t in ts]
        cpu, gpu = sum(n[0] for n in needs), sum(n[1] for n in needs)
        big = max(needs)
        out.append(f"totals   {stage:<8} {len(ts)} trial(s); requests {fmt(cpu)} CPU and {fmt(gpu)} GPU in all "
                   f"(largest trial {fmt(big[0])} CPU, {fmt(big[1])} GPU)")
    out.append(f"totals   all      {len(spec.trials)} trial(s), {len(flagged)} marked ! (named by a problem)")
    if spec.left_out:
        n_pre = sum(1 for t in spec.left_out if not t.startswith("seg-"))
        out.append(f"left out {n_pre} pretraining + {len(spec.left_out) - n_pre} segmentation trial(s) whose (source, "
                   "backbone) pair has no weights (see the problems)")
    return "\n".join(out)


def plan_json(spec: GridSpec, problems: list[str]) -> str:
    """The plan of a dry run as ONE JSON document (`--dry-run --json`): every trial the grid schedules (id,
    stage, the trials it depends on, its resources, its validated config) and every problem, one line each
    (what the text dry run prints on stderr, without the `twinseg: error:` prefix)."""
    import json

    trials = [{"id": t.id, "stage": t.stage, "depends_on": list(t.depends_on), "resources": dict(t.resources),
               "config": t.config} for t in spec.trials]
    return json.dumps({"trials": trials, "problems": list(problems)}, indent=1, default=str)
