"""A grid trial on several devices: one Ray Train run (TorchTrainer + Lightning DDP) per trial.

A stage-1 / stage-2 trial whose config says `devices: N` (N > 1) runs here instead of in the Tune
trial's own process. The pattern is the one Ray documents for Ray Train V2 inside Ray Tune
(Ray 2.60, V2 is the default): the Tune function trainable is only the *driver*; it calls
`ray.train.torch.TorchTrainer(...).fit()`, which schedules the N workers itself.

Resources
* The Tune trial reserves `DRIVER_CPU` (0.01 CPU, no GPU; experiments/engine/checks.py counts it) while it waits on the
  Train run; `ScalingConfig(num_workers=N, resources_per_worker={"CPU": cpu, "GPU": gpu},
  use_gpu=gpu > 0)` reserves the grid's per-trial `resources` for EACH worker. CPU workers use gloo,
  GPU workers NCCL (TorchConfig's default for use_gpu).

Workers (`_worker`, one per rank)
* Each worker calls the trial's run function (`experiments.engine.runner.RunFunction`; by
  default `experiments.engine.runner.run_stage`, i.e. `core.runs.pretrain.run_pretrain` /
  `core.runs.segment.run_segment`) with `ddp=core.runs.common.ExternalDDP(...)`: Lightning's Trainer
  gets `RayDDPStrategy()` and `RayLightningEnvironment()` and goes through `prepare_trainer`. core
  never imports ray: the Ray pieces are injected from here. The run function travels to the workers
  in `train_loop_config` (pickled like the Tune trainable).
* `batch_size` is PER WORKER: the global batch is N x batch_size (Barlow Twins' cross-correlation is
  taken over the global batch; the optimiser's learning rate scales with the global batch).
* Only global rank 0 writes the run folder's files; metrics.json is still written last and
  atomically, so its presence still means "finished".

State and storage
* The run folder `<results>/trials/<id>/` stays the source of truth: a finished trial is never
  rerun (checked here before any worker starts), and a Tune retry or `--resume` builds a new
  TorchTrainer whose workers resume from `checkpoints/last.ckpt` (Lightning's checkpoint, written by
  rank 0, read by every rank: on several nodes the results folder must be on shared storage).
* Ray Train's own checkpointing is not used (Train's FailureConfig keeps max_failures=0; the grid's
  `retries` retry the whole trial). The Train run's storage (its marker file and state snapshot)
  goes to `<results>/ray/train-<id>/` (`payload["ray_storage"]`, next to Tune's own folder), or to
  `<trial dir>/.ray_train/` when the payload has none; the name is stable per trial, as Ray's docs
  recommend for retries.
* Per-epoch metrics: every rank calls `ray.train.report` at the end of each training epoch (a
  synchronising call, so all ranks make it); `TuneReportCallback` forwards rank 0's to Tune.
* Errors: `fit()` raises `WorkerGroupError`; the driver re-raises the worker's own exception (a
  twinseg error first, else the lowest rank's), so trials/<id>/error.txt names the real cause.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from experiments.engine.runner import build_config, epoch_scalars, run_stage, setup_trial_env, trial_config

DRIVER_CPU = 0.01  # what the Tune trial (the Train driver) reserves for itself
STORAGE_DIR = ".ray_train"  # in the trial folder, when the payload names no Ray folder


def workers(payload: dict) -> int:
    """Number of DDP workers of a trial (its config's `devices`), 1 for a single-process trial."""
    try:
        return max(1, int((payload.get("config") or {}).get("devices", 1) or 1))
    except (TypeError, ValueError):
        return 1


def storage(payload: dict) -> tuple[str, str]:
    """(storage_path, name) of the trial's Ray Train run."""
    tid = payload["id"]
    root = payload.get("ray_storage")
    if root:
        return str(Path(root).resolve()), f"train-{tid}"
    return str((Path(payload["dir"]) / STORAGE_DIR).resolve()), f"train-{tid}"


def scaling(payload: dict) -> dict:
    """ScalingConfig arguments: N workers, each with the trial's per-worker resources."""
    r = payload.get("resources") or {}
    cpu, gpu = float(r.get("cpu", 1)), float(r.get("gpu", 0))
    per = {"CPU": cpu}
    if gpu > 0:
        per["GPU"] = gpu
    return {"num_workers": workers(payload), "use_gpu": gpu > 0, "resources_per_worker": per}


# ----------------------------------------------------------------------------- driver (the Tune trial)
def run_ddp(payload: dict, run: Optional[Callable[..., dict]] = None) -> Optional[dict]:
    """Run the trial described by `payload` as a Ray Train job whose workers call `run` (an
    `experiments.engine.runner.RunFunction`, default `run_stage`); returns its metrics.json
    (None if the job ended without writing it). Needs a running Ray (the grid's)."""
    from core.io import read_metrics

    out = Path(payload["dir"])
    done = read_metrics(out)
    if done is not None:  # finished earlier: never rerun, no worker started
        return done

    import ray.train
    from ray.train.torch import TorchTrainer

    path, name = storage(payload)
    callbacks = []
    try:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    except Exception:  # noqa: BLE001 - not inside a Tune trial (direct use): no forwarding
        pass
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"payload": payload, "run": run},
        scaling_config=ray.train.ScalingConfig(**scaling(payload)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=callbacks,
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001
        cause = root_cause(e)
        if cause is e:
            raise
        raise cause from e  # the worker's exception; error.log keeps Ray's report (with the worker traceback)
    return read_metrics(out)



def root_cause(e: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray Train's `WorkerGroupError` / `ControllerError`: a
    twinseg error first (a user error on one rank), else the lowest rank's."""
    from core.errors import TwinsegError

    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        errs = [_unwrap(failures[k]) for k in sorted(failures)]
        own = [x for x in errs if isinstance(x, TwinsegError)]
        return (own or errs)[0]
    cf = getattr(e, "controller_failure", None)
    if isinstance(cf, BaseException):
        return _unwrap(cf)
    return e


def _unwrap(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)  # RayTaskError wraps the user's exception
    return cause if isinstance(cause, BaseException) else e


# ----------------------------------------------------------------------------- workers (one per rank)
def _worker(config: dict) -> None:
    """One DDP rank: the trial's run function on the trial folder with Ray's Lightning pieces."""
    import ray.train
    import torch

    payload = config["payload"]
    tid, stage, out = payload["id"], payload["stage"], Path(payload["dir"])
    setup_trial_env(payload, out)
    ctx = ray.train.get_context()
    rank, world = int(ctx.get_world_rank()), int(ctx.get_world_size())

    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from core.runs.common import ExternalDDP, resolve_accelerator

    config_dict = trial_config(payload)
    cfg = build_config(stage, config_dict)
    accelerator, _ = resolve_accelerator(cfg.device, 1)  # device=cuda on a worker without a GPU: ConfigError
    if accelerator == "gpu":
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
    ddp = ExternalDDP(accelerator=accelerator, device=device, world_size=world, global_rank=rank,
                      strategy=RayDDPStrategy(), plugins=(RayLightningEnvironment(),), prepare=prepare_trainer)
    run = config.get("run") or run_stage
    run(stage, config_dict, out, progress=False, wandb_group=payload.get("group"), name=tid,
        callbacks=[_epoch_report_callback(tid)], ddp=ddp)


def _epoch_report_callback(tid: str):
    import lightning.pytorch as pl

    class TrainEpochReport(pl.Callback):
        """Every rank reports each training epoch to Ray Train (`ray.train.report` synchronises the
        ranks, so all of them call it); TuneReportCallback forwards rank 0's metrics to Tune."""

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if getattr(trainer, "sanity_checking", False):
                return
            import ray.train

            ray.train.report({"trial": tid, "epoch": int(trainer.current_epoch + 1), "done_run": 0,
                              **epoch_scalars(trainer)})

    return TrainEpochReport()


__all__ = ["DRIVER_CPU", "workers", "storage", "scaling", "run_ddp", "root_cause"]
