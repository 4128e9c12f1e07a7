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
    # offline, `wandb.finish` returns before wandb's service process has written the run file (on a loaded
    # machine the file held its header only); `wandb.teardown` waits for that process to close its files and exit
    wandb.teardown()

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


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_online_without_network_is_one_line_within_the_timeout(tmp_path, monkeypatch):
    """`wandb=online`, a well-formed key and no wandb server (was: 104 s, then a CommError traceback): wandb.init
    waits TWINSEG_WANDB_INIT_TIMEOUT seconds (wandb's init_timeout), then one ConfigError line saying how to go
    offline; no run is left open."""
    import time

    import wandb

    from core.errors import ConfigError

    server = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", server)
    monkeypatch.setenv("TWINSEG_WANDB_INIT_TIMEOUT", "2")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wb = make_loggers(tmp_path, "online", group="g", name="trial-a", config={})[1]
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        wb.experiment  # what Lightning touches first in fit (log_hyperparams)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"wandb=online: the wandb server {server} did not start the run "
                                              "within 2 s ("), msg
    assert msg.endswith(f"or use --wandb offline and `wandb sync {tmp_path / 'wandb'}/offline-run-*` later"), msg
    assert took < 40, f"wandb.init waited {took:.0f} s with a 2 s init timeout (was 104 s)"
    assert wandb.run is None


@pytest.mark.parametrize("value", ["-1", "0", "soon", "nan", "inf"])
def test_bad_init_timeout_is_refused_in_one_line(value, monkeypatch):
    from core.config import check_wandb
    from core.errors import ConfigError

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("TWINSEG_WANDB_INIT_TIMEOUT", value)
    with pytest.raises(ConfigError, match=rf"^TWINSEG_WANDB_INIT_TIMEOUT='{value}' must be a number of seconds > 0 "):
        check_wandb("online")
    assert check_wandb("offline") is None  # only online mode waits for a server
    monkeypatch.setenv("TWINSEG_WANDB_INIT_TIMEOUT", "7.5")
    assert check_wandb("online") == 7.5
    monkeypatch.delenv("TWINSEG_WANDB_INIT_TIMEOUT")
    assert check_wandb("online") == 30.0


def test_a_malformed_key_is_refused_before_anything_runs(monkeypatch):
    """A short key (was: an immediate AuthenticationError traceback from wandb.init): refused by check_wandb, which
    the runs and the grid's pre-check call before anything is built, with wandb's own reason."""
    from core.config import check_wandb
    from core.errors import ConfigError

    monkeypatch.setenv("WANDB_API_KEY", "short")
    with pytest.raises(ConfigError, match=r"^wandb=online: WANDB_API_KEY is not a wandb API key \(API key must "
                                          r"have 40\+ characters, has 5\); .*--wandb offline and `wandb sync` later"):
        check_wandb("online")


def test_every_wandb_init_error_is_one_line_naming_the_way_offline(tmp_path, monkeypatch):
    """The server refusing the key, a timeout with wandb's multi-line hint, a usage error: one line each."""
    import wandb

    from core.runs.common import wandb_failure

    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example:8080")
    offline = f"or use --wandb offline and `wandb sync {tmp_path / 'wandb'}/offline-run-*` later"
    auth = wandb_failure(wandb.errors.AuthenticationError("API key is invalid"), tmp_path, 30.0)
    assert auth == ("wandb=online: the wandb server refused the API key (API key is invalid); check WANDB_API_KEY "
                    f"or run `wandb login`, {offline}")
    comm = wandb_failure(wandb.errors.CommError("Timed out while retrying\nConsider increasing the init_timeout"),
                         tmp_path, 30.0)
    assert comm.startswith("wandb=online: the wandb server http://wandb.example:8080 did not start the run within "
                           "30 s (Timed out while retrying); ") and comm.endswith(offline)
    usage = wandb_failure(wandb.errors.UsageError("resume='must' but run abc does not exist"), tmp_path, 30.0)
    assert usage == f"wandb=online: wandb.init failed (UsageError: resume='must' but run abc does not exist); {offline}"
    assert all("\n" not in m for m in (auth, comm, usage))
