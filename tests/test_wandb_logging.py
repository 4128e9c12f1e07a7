"""core.runs.common.make_loggers: CSV always, wandb offline by default (no login, no prompt, no network)."""

from __future__ import annotations

import pytest

from core.runs.common import _wandb_id, finish_wandb, make_loggers


def test_offline_wandb_run_is_written_locally_without_login(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    loggers = make_loggers(tmp_path, "offline", group="smoke-20260101-000000", name="trial-a",
                           config={"lr": 0.1, "backbone": "vit_nano_patch8"})
    kinds = [type(lg).__name__ for lg in loggers]
    assert kinds == ["CSVLogger", "WandbLogger"]
    wb = loggers[1]
    wb.log_metrics({"train/loss": 1.25}, step=0)
    run = wb.experiment
    assert run.group == "smoke-20260101-000000" and run.name == "trial-a"
    assert run.id == _wandb_id(tmp_path)  # stable per folder: a resumed trial continues the same run
    assert dict(run.config)["backbone"] == "vit_nano_patch8"
    finish_wandb(loggers)  # what run_pretrain / run_segment call in their `finally`
    assert wandb.run is None

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    blob = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"train/loss" in blob and b"smoke-20260101-000000" in blob
    err = capfd.readouterr().err
    assert "anonymous" not in err  # Lightning's anonymous=None no longer triggers wandb's deprecation warning


def test_disabled_wandb_gives_csv_only(tmp_path):
    loggers = make_loggers(tmp_path, "disabled", group=None, name="x", config={})
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    assert not (tmp_path / "wandb").exists()


def test_a_run_left_open_in_the_process_does_not_swallow_the_next_trial(tmp_path, monkeypatch):
    """Lightning attaches to an open `wandb.run`; make_loggers closes a leftover one first, so the new
    trial gets its own run, name and group (a reused worker process must not log into the last trial)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    old = wandb.init(mode="offline", dir=str(tmp_path / "old"), group="old-grid", name="old-trial",
                     project="twinseg-test")
    (tmp_path / "new").mkdir()
    wb = make_loggers(tmp_path / "new", "offline", group="new-grid", name="new-trial", config={})[1]
    assert wandb.run is None  # the leftover was finished
    run = wb.experiment
    assert run.id != old.id and run.group == "new-grid" and run.name == "new-trial"
    wandb.finish()


def test_a_failure_to_close_the_run_warns_and_does_not_raise(monkeypatch):
    import wandb

    class Boom(Exception):
        pass

    def finish(*a, **k):
        raise Boom("sync service gone")

    class FakeRun:
        pass

    monkeypatch.setattr(wandb, "run", FakeRun())
    monkeypatch.setattr(wandb, "finish", finish)
    WandbLogger = type("WandbLogger", (), {})
    with pytest.warns(RuntimeWarning, match="closing the run failed .*Boom: sync service gone"):
        finish_wandb([WandbLogger()])
