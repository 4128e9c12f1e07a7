"""core.runs.common.make_loggers: CSV always, wandb offline by default (no login, no prompt, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.runs.common import _wandb_id, make_loggers


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
    wandb.finish()

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
