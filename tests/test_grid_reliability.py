"""experiments/grid.py under hostile input and interruptions: every case ends in a non-zero exit, ONE
`twinseg: error:` line and nothing that could pass for a result (docs/reliability.md, "Grids").

Most cases call `experiments.engine.cli.main` in-process without Ray (`import ray` fails, as in
tests/test_grid_dry_run.py); the ones that need a running grid use tests/fake_grid.py (fake trials)
or, once, the real trials on tiny sizes (`@pytest.mark.slow`).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from core.stages import PRETRAIN
from experiments.engine import axes, checks, cli, cost, driver, expand, gridfile, spec, state
from experiments.engine.console import Console
from experiments.engine.ray_backend import probe_address
from tests.test_grid import TINY as _GRID_TINY

REPO = Path(__file__).resolve().parent.parent
VIT = "pt-vit_nano_patch8-random-bt-l0.0051-s0"
RES = "pt-resnet_tiny-random-bt-l0.0051-s0"

# test_grid's tiny grid, one trial at a time, two retries, E1 only
TINY = {**copy.deepcopy(_GRID_TINY), "max_concurrent": 1, "retries": 2}
TINY["stage2"]["evaluations"] = [{"evaluation": "E1", "from": {"backbone": "resnet_tiny"}}]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """cwd = a fresh folder; offline, empty weights folder, no GPU; `import ray` fails."""
    cwd = tmp_path / "cwd"
    (cwd / "weights").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TWINSEG_WEIGHTS", str(cwd / "weights"))
    monkeypatch.setenv("TWINSEG_DATA_DIR", str(cwd / "data"))
    monkeypatch.setenv("TWINSEG_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(checks, "local_gpu_count", lambda: 0)
    monkeypatch.setitem(sys.modules, "ray", None)
    return cwd


def _grid(where: Path, doc: dict, name: str = "tiny") -> Path:
    p = where / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _main(capsys, *argv) -> tuple[int, str, list[str]]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.splitlines() if ln.strip()]


def _one_line(rc: int, out: str, err: list[str], fragment: str, code: int = 2) -> str:
    assert rc == code, (rc, err)
    assert len(err) == 1 and err[0].startswith("twinseg: error: "), err
    assert fragment in err[0], err[0]
    assert "Traceback" not in out + "\n".join(err)
    return err[0]


def _results_like(root: Path) -> list[str]:
    """Files under `root` that could pass for results (anything but the driver's lock file)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock")


def _fake_results(out: Path, doc: dict, grid_path: Path) -> spec.GridSpec:
    """A results folder as a driver leaves it after a kill: grid.yaml, summary.json (every trial
    pending), trial.json of the first trial and metrics.json of ... none (configs are what matter)."""
    grid = expand.build_grid(copy.deepcopy(doc), grid_path, None, check_models=False)
    (out / "trials").mkdir(parents=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid.raw, sort_keys=False))
    st = state.GridState(grid, out, "2026-01-01T00:00:00", Console(), group="g", wandb="disabled")
    st.write_summary()
    return grid


# ----------------------------------------------------------------------------- refused before anything
@pytest.mark.parametrize("target", ["/", "/usr", "/etc", "/proc/self", "HOME"])
def test_output_system_folder_refused(tmp_path, env, capsys, monkeypatch, target):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target = str(home) if target == "HOME" else target
    rc, out, err = _main(capsys, "--grid", _grid(tmp_path, TINY), "--output", target)
    line = _one_line(rc, out, err, f"--output {target}: ")
    assert "system folder" in line or "home folder" in line
    assert list(home.iterdir()) == []


def test_too_many_trials_refused_with_the_count(tmp_path, env, capsys):
    doc = copy.deepcopy(TINY)
    doc["stage1"]["axes"]["seed"] = list(range(100_000))  # 2 x 100,000 trials
    big = tmp_path / "tiny.yaml"
    big.write_text(json.dumps(doc))  # JSON is YAML (and fast to write)
    axes.stage1_axes()  # the method registry's imports (Lightning) are not what is timed
    t0 = time.time()
    rc, out, err = _main(capsys, "--grid", big, "--output", tmp_path / "out")
    line = _one_line(rc, out, err, "max_trials=1000 is exceeded: stage1.axes expand to 200,000 trials")
    assert "--max-trials" in line
    assert time.time() - t0 < 30  # linear duplicate check, counted before expansion
    assert not (tmp_path / "out").exists()
    # the limit is configurable: --max-trials lowers it (the grid has 3 trials)
    rc, out, err = _main(capsys, "--grid", _grid(tmp_path, TINY), "--max-trials", "2", "--dry-run")
    _one_line(rc, out, err, "max_trials=2 is exceeded: stage1 (2) + stage2 (1) expand to 3 trials")


def test_duplicate_seed_among_100000_is_found_fast(tmp_path):
    doc = copy.deepcopy(TINY)
    doc["max_trials"] = 10**6
    doc["stage1"]["axes"]["seed"] = list(range(100_000)) + ["99999"]
    axes.stage1_axes()
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"stage1.axes.seed\[100000\]='99999' is listed twice"):
        expand.build_grid(doc, tmp_path / "g.yaml", check_models=False)
    assert time.time() - t0 < 5


def test_billion_laughs_yaml_refused(tmp_path, env, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    p = tmp_path / "laughs.yaml"
    p.write_text("\n".join(lines) + "\n")
    rc, out, err = _main(capsys, "--grid", p, "--output", tmp_path / "out")
    _one_line(rc, out, err, "laughs.yaml: the YAML expands to more than 100,000 values through its aliases")
    assert not (tmp_path / "out").exists()
    # a modest alias is fine
    assert gridfile.safe_load_limited("x: &x [1, 2]\ny: *x\n", "ok.yaml") == {"x": [1, 2], "y": [1, 2]}


def test_checkpoint_folder_as_source_is_one_problem(tmp_path, env, capsys):
    ckpt_dir = tmp_path / "some_run"
    ckpt_dir.mkdir()
    doc = copy.deepcopy(TINY)
    doc["stage2"]["evaluations"].append({"evaluation": "E1", "from": "none", "tag": "mine",
                                         "settings": {"backbone": "resnet_tiny", "source": f"checkpoint:{ckpt_dir}"}})
    rc, out, err = _main(capsys, "--grid", _grid(tmp_path, doc), "--dry-run")
    line = _one_line(rc, out, err, f"source=checkpoint:{ckpt_dir}")
    assert "is a folder, not a weights file" in line and str(ckpt_dir / "backbone.pt") in line


def test_address_that_nobody_answers_is_one_line_in_seconds():
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"--address 127.0.0.1:1: cannot reach the Ray cluster"):
        probe_address("127.0.0.1:1", 5)
    assert time.time() - t0 < 10
    # a connection that hangs (ray.init never returns) ends after the deadline, one line, exit 2
    code = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from experiments.engine.ray_backend import with_deadline
        with_deadline(lambda: time.sleep(60), 1.0, "--address X: the Ray cluster did not answer within 1 s")
    """ % str(REPO))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "twinseg: error: --address X: the Ray cluster did not answer within 1 s"


def test_disk_full_is_one_line(tmp_path, env, capsys, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(driver, "atomic_write_text", full)  # grid.yaml
    monkeypatch.setattr(state, "atomic_write_text", full)  # summary.json / .csv
    out = tmp_path / "out"
    rc, o, err = _main(capsys, "--grid", _grid(tmp_path, TINY), "--output", out)
    line = _one_line(rc, o, err, f"cannot write {out / 'grid.yaml'} (No space left on device)")
    assert "--resume" in line
    assert _results_like(out) == []


def test_second_driver_on_the_same_folder_is_refused(tmp_path, env, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from core.folder_lock import folder_lock
        with folder_lock({str(out)!r}, "grid driver"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, o, err = _main(capsys, "--grid", _grid(tmp_path, TINY), "--output", out)
        _one_line(rc, o, err, f"{out} is in use by another grid driver (pid {holder.pid}")
        assert _results_like(out) == []
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- resume with another grid
def test_resume_after_editing_the_stored_grid_is_refused(tmp_path, env, capsys):
    out = tmp_path / "out"
    g = _grid(tmp_path, TINY)
    _fake_results(out, TINY, g)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stored = yaml.safe_load((out / "grid.yaml").read_text())
    stored["stage1"]["settings"]["epochs"] = 2
    (out / "grid.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    rc, o, err = _main(capsys, "--resume", "--output", out)
    line = _one_line(rc, o, err, f"--resume: the stored {out / 'grid.yaml'} differs from what {out} ran")
    assert "epochs 1 -> 2" in line and "1 more trial(s) changed" in line and "only ADDING trials" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "grid.yaml"} == \
        {p: b for p, b in before.items() if p.name != "grid.yaml"}


def test_resume_with_an_edited_grid_file(tmp_path, env, capsys):
    out = tmp_path / "out"
    g = _grid(tmp_path, TINY)
    _fake_results(out, TINY, g)
    # a changed setting: refused, naming the trial and the field
    doc = copy.deepcopy(TINY)
    doc["stage2"]["settings"]["batch_size"] = 8
    rc, o, err = _main(capsys, "--resume", "--output", out, "--grid", _grid(tmp_path, doc, "edited"), "--dry-run")
    line = _one_line(rc, o, err, f"--resume: --grid {tmp_path / 'edited.yaml'} differs from what {out} ran: "
                                 f"trial seg-E1-from-{RES} changed: batch_size 4 -> 8")
    # a removed trial: refused
    doc = copy.deepcopy(TINY)
    doc["stage1"]["axes"]["backbone"] = ["resnet_tiny"]
    rc, o, err = _main(capsys, "--resume", "--output", out, "--grid", _grid(tmp_path, doc, "fewer"), "--dry-run")
    _one_line(rc, o, err, f"1 trial(s) removed ({VIT})")
    # only additions (another seed): allowed, the plan lists the new trials
    doc = copy.deepcopy(TINY)
    doc["stage1"]["axes"]["seed"] = [0, 1]
    rc, o, err = _main(capsys, "--resume", "--output", out, "--grid", _grid(tmp_path, doc, "more"), "--dry-run")
    assert rc == 0 and err == [], err
    assert "pt-resnet_tiny-random-bt-l0.0051-s1" in o and "resuming" in o
    assert line  # (kept for the failure message)


def test_resume_after_a_code_default_change(tmp_path, env, capsys):
    """The grid file is unchanged but the code's defaults moved: a relevant field refuses the resume
    (saying so); another SSL method's section of a trial (dino.* of a Barlow Twins run) does not."""
    out = tmp_path / "out"
    _fake_results(out, TINY, _grid(tmp_path, TINY))
    s = json.loads((out / "summary.json").read_text())
    for t in s["trials"]:
        if t["stage"] == PRETRAIN.name:
            t["config"]["dino"]["teacher_temp"] = 0.5  # irrelevant to a Barlow Twins trial
    (out / "summary.json").write_text(json.dumps(s))
    rc, o, err = _main(capsys, "--resume", "--output", out, "--dry-run")
    assert rc == 0 and err == [], err
    for t in s["trials"]:
        if t["id"] == VIT:
            t["config"]["barlow_twins"]["lambd"] = 0.5
    (out / "summary.json").write_text(json.dumps(s))
    rc, o, err = _main(capsys, "--resume", "--output", out, "--dry-run")
    line = _one_line(rc, o, err, f"--resume: the grid of {out} is unchanged but its trials' configs are not: "
                                 f"trial {VIT} changed: barlow_twins.lambd 0.5 -> 0.0051;")
    assert "run the code it ran with (its defaults may have changed)" in line


def test_relative_checkpoint_source_is_read_against_the_grid_folder(tmp_path, env, capsys):
    """`checkpoint:bb.pt` in a grid names the bb.pt beside the grid file, whatever the current folder (which
    holds a different bb.pt): the trial's config and id hold that absolute path, so the same grid file
    resumes from anywhere while a copy of it elsewhere (naming another bb.pt) is another trial."""
    gdir = tmp_path / "grids"
    gdir.mkdir()
    (gdir / "bb.pt").write_bytes(b"weights beside the grid")
    (env / "bb.pt").write_bytes(b"other weights in the current folder")
    doc = copy.deepcopy(TINY)
    doc["stage1"]["axes"]["source"] = ["checkpoint:bb.pt"]
    g = _grid(gdir, doc)
    rc, o, err = _main(capsys, "--grid", g, "--dry-run", "--json")
    assert rc == 0, err
    pre = [t for t in json.loads(o)["trials"] if t["stage"] == PRETRAIN.name]
    want = f"checkpoint:{(gdir / 'bb.pt').resolve()}"
    assert len(pre) == 2 and {t["config"]["source"] for t in pre} == {want}, pre
    assert all(t["id"].startswith(f"pt-{t['config']['backbone']}-{axes.source_tag(want)}-") for t in pre)
    out = tmp_path / "out"
    _fake_results(out, doc, g)
    assert yaml.safe_load((out / "grid.yaml").read_text())["stage1"]["axes"]["source"] == [want]
    rc, o, err = _main(capsys, "--resume", "--output", out, "--grid", g, "--dry-run")
    assert rc == 0 and err == [], err
    rc, o, err = _main(capsys, "--resume", "--output", out, "--grid", _grid(env, doc), "--dry-run")
    _one_line(rc, o, err, "3 trial(s) removed")  # the copy beside the other bb.pt names other trials


def test_a_ray_job_driver_refuses_results_inside_its_working_dir_copy(tmp_path, env, capsys, monkeypatch):
    """A Ray Job's driver runs in a temporary unpacked copy of --working-dir (the current folder): a relative
    --output (or the default results/) would vanish with it, so it is one line before anything is written;
    an absolute --output elsewhere is fine."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}))
    g = _grid(tmp_path, TINY)
    for args in (["--output", "run"], []):
        rc, o, err = _main(capsys, "--grid", g, *args, "--dry-run")
        line = _one_line(rc, o, err, "this grid runs as a Ray Job whose driver works in a temporary copy of "
                                     f"--working-dir ({env.resolve()})")
        assert "pass --storage s3://bucket/prefix or an absolute --output" in line
    assert _results_like(env) == []
    rc, o, err = _main(capsys, "--grid", g, "--output", tmp_path / "abs", "--dry-run")
    assert rc == 0 and err == [], err


# ----------------------------------------------------------------------------- cost estimate
def test_cost_estimate_is_the_formula_and_names_its_sources(tmp_path, env, capsys):
    grid = expand.build_grid(copy.deepcopy(TINY), tmp_path / "tiny.yaml", check_models=False)
    est = cost.estimate_grid(grid)
    by = {t.id: t for t in est.trials}
    # vit_nano_patch8 pretraining on CPU: 68 img/s at 64 px (make run's metrics) -> x4 at 32 px; 1 epoch x 8 images
    assert by[VIT].device_hours == pytest.approx(8 / (68.0 * 4) / 3600)
    assert by[VIT].images == 8 and by[VIT].source.startswith("measured: `make run`")
    params = cost.param_count("vit_nano_patch8")
    assert by[VIT].keep_mb == pytest.approx(params * 4 / 2**20 + cost.FIGURES_MB)
    rows = {(r.backbone, r.device) for r in cost.THROUGHPUT}
    assert len(rows) == len({(r.backbone, r.device, r.stage) for r in cost.THROUGHPUT}) - 2  # one home per row
    assert all(r.source.startswith("not measured") for r in cost.THROUGHPUT if r.device == "gpu")
    rc, out, err = _main(capsys, "--grid", _grid(tmp_path, TINY), "--dry-run")
    assert rc == 0, err
    assert "cost     pretrain 2 trial(s), 16 training images in all" in out
    assert "cost     all      ~" in out and "speed [1] measured: `make run` on this project's 2-core CPU" in out
    # a GPU grid says that its speeds are estimates
    doc = copy.deepcopy(TINY)
    doc["stage1"]["axes"]["backbone"] = ["vit_small_patch16"]
    doc["stage1"]["resources"] = {"cpu": 1, "gpu": 1}
    doc["stage2"]["evaluations"] = [{"evaluation": "E1", "from": {"backbone": "vit_small_patch16"}}]
    doc["data"]["image_size"] = 224
    grid = expand.build_grid(doc, tmp_path / "gpu.yaml", check_models=False)
    text = cost.estimate_grid(grid).text()
    assert "GPU speeds are NOT measured yet" in text and "not measured: estimate from BENCHMARKS.md's H100 target" in text


# ----------------------------------------------------------------------------- running grids (Ray)
FAKE_RUN = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import ray.cloudpickle
    import fakes
    from core.errors import NonFiniteError
    from experiments.engine import cli

    class Diverges(fakes.FakeRun):
        def __call__(self, stage, config, out_dir, *, name=None, **kw):
            if name == {bad!r}:
                with open(f"{{out_dir}}/calls.log", "a") as f:
                    f.write("start\\n")
                raise NonFiniteError("pretrain loss is nan at epoch 1 step 3; lower the learning rate")
            return super().__call__(stage, config, out_dir, name=name, **kw)

    ray.cloudpickle.register_pickle_by_value(fakes)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sys.exit(cli.main(sys.argv[1:], run=Diverges({sleep})))
""")


def _env() -> dict:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return e


def _summary(out: Path) -> dict:
    return {t["id"]: t for t in json.loads((out / "summary.json").read_text())["trials"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_moved_or_copied_results_folder_resumes(tmp_path):
    """References between trials are relative to the results folder: a finished grid (fake trials) moved
    elsewhere resumes its one unfinished trial from the stage-1 weights at the NEW place, reruns nothing
    else; a copy of the moved folder resumes with nothing to run."""
    from tests.test_grid import FAKE_GRID

    g = _grid(tmp_path, TINY)
    first, moved, copied = tmp_path / "first", tmp_path / "elsewhere" / "moved", tmp_path / "copied"
    seg = f"seg-E1-from-{RES}"
    cmd = [sys.executable, str(FAKE_GRID), "--", "--num-cpus", "2", "--no-dashboard", "--no-report"]
    r = subprocess.run([*cmd, "--grid", str(g), "--output", str(first)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _summary(first)[seg]["config"]["source"] == f"checkpoint:trials/{RES}/backbone.pt"
    moved.parent.mkdir()
    first.rename(moved)  # nothing can still point into `first`
    (moved / "trials" / seg / "metrics.json").unlink()
    calls = {t: (moved / "trials" / t / "calls.log").read_text() for t in (VIT, RES, seg)}
    r = subprocess.run([*cmd, "--resume", "--output", str(moved)], cwd=moved.parent, env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(resuming: 2 trial(s) already done)" in r.stdout
    assert all(t["status"] == "done" for t in _summary(moved).values())
    assert {t: (moved / "trials" / t / "calls.log").read_text() for t in (VIT, RES)} == {t: calls[t] for t in (VIT, RES)}
    assert (moved / "trials" / seg / "calls.log").read_text() == calls[seg] + "resume\n"
    ran = json.loads((moved / "trials" / seg / "config.json").read_text())
    assert ran["source"] == f"checkpoint:{(moved / 'trials' / RES / 'backbone.pt').as_posix()}"
    shutil.copytree(moved, copied)
    r = subprocess.run([*cmd, "--resume", "--output", str(copied)], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "nothing to run: every trial is already finished" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nonfinite_trial_fails_once_without_retry_and_sigterm_stops_cleanly(tmp_path):
    """(1) A NonFiniteError in a trial: `failed` with its one line, NOT retried (retries: 2), its
    dependant skipped. (2) SIGTERM to a driver while a trial runs: exit 143, one line saying how to
    continue, summary.json marks the unfinished trials interrupted, no C-level dump."""
    g = _grid(tmp_path, TINY)
    script = tmp_path / "run_grid.py"
    script.write_text(FAKE_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), bad=RES, sleep=0.0))
    out = tmp_path / "out"
    common = ["--num-cpus", "2", "--no-dashboard", "--no-report"]
    r = subprocess.run([sys.executable, str(script), "--grid", str(g), "--output", str(out), *common],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 1, r.stdout + r.stderr
    s = _summary(out)
    assert s[RES]["status"] == "failed"
    assert s[RES]["reason"] == "NonFiniteError: pretrain loss is nan at epoch 1 step 3; lower the learning rate"
    assert (out / "trials" / RES / "calls.log").read_text().split() == ["start"]  # not retried
    assert "retry" not in r.stdout
    assert s[f"seg-E1-from-{RES}"]["status"] == "skipped" and s[VIT]["status"] == "done"
    assert r.stderr.strip().splitlines()[-1].startswith("twinseg: error: 1 trial(s) failed and 1 skipped")

    # (2) SIGTERM while the first trial runs (fake trials of 30 s)
    script.write_text(FAKE_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), bad="none", sleep=30.0))
    out2 = tmp_path / "out2"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(script), "--grid", str(g), "--output", str(out2), *common],
                             cwd=tmp_path, env=_env(), stdout=f, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while "start    " not in log.read_text():
            assert p.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.3)
        time.sleep(2)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
    assert p.returncode == 143, (p.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("twinseg:")]
    assert lines == [f"twinseg: error: grid interrupted by SIGTERM with 3 trial(s) not finished; continue with "
                     f"python experiments/grid.py --resume --output {out2}"], err
    assert "SIGTERM received at time" not in err and "Traceback" not in err
    s = _summary(out2)
    assert sorted(t["reason"] for t in s.values()) == [
        "interrupted before it started; continue with --resume",
        "interrupted before it started; continue with --resume",
        "interrupted while running; continue with --resume"]
    assert not list(out2.glob("trials/*/metrics.json"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_grid_killed_with_sigterm_and_resumed_matches_uninterrupted(tmp_path):
    """The real trials (tiny: 32 px, 1 epoch, tiny backbones, 8 generated images): a grid stopped by
    SIGTERM once its first trial has finished, then resumed, ends with the same trials, statuses and
    configs as the same grid run without interruption."""
    doc = copy.deepcopy(TINY)
    doc["stage1"]["axes"]["backbone"] = ["resnet_tiny"]
    doc["stage1"]["settings"].update({"diagnostics_every": 0})
    g = _grid(tmp_path, doc)
    env = _env()
    env["TWINSEG_DATA_DIR"] = str(tmp_path / "data")
    common = ["--grid", str(g), "--num-cpus", "2", "--no-dashboard", "--no-report"]
    grid_py = str(REPO / "experiments" / "grid.py")

    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, grid_py, *common, "--output", str(ref)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr

    out = tmp_path / "out"
    with open(tmp_path / "log.txt", "w") as f:
        p = subprocess.Popen([sys.executable, grid_py, *common, "--output", str(out)], cwd=tmp_path, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (out / "trials" / RES / "metrics.json").exists():
            assert p.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    assert p.returncode == 143, (tmp_path / "log.txt").read_text()
    r = subprocess.run([sys.executable, grid_py, "--resume", "--output", str(out), "--num-cpus", "2",
                        "--no-dashboard", "--no-report"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr

    def comparable(root: Path) -> dict:
        s = json.loads((root / "summary.json").read_text().replace(root.resolve().as_posix(), "<OUT>"))
        return {t["id"]: (t["stage"], t["status"], t["depends_on"], t["config"]) for t in s["trials"]}

    assert comparable(out) == comparable(ref)
    assert all(t["status"] == "done" for t in _summary(out).values())
