"""The grid engine: the whole study (stage 1 pretraining -> stage 2 segmentation) as one Ray Tune
experiment. `experiments/grid.py` is its entry point (cli.py `main`).

Modules, one job each (no module imports one that imports it back: tests/test_engine_imports.py):
  gridfile.py        find and read a grid file (YAML limits), CLI overrides; the schema (its docstring)
  axes.py            the stage-1 axes, axis matching, trial ids
  validate.py        checks both stages' expansion shares (the one-line error helper, settings keys,
                     overrides, resources / devices, backbone-level checks)
  stage1.py          stage-1 expansion (`stage1:`) into pretraining trials
  stage2.py          stage-2 expansion (`stage2:`) into segmentation trials
  expand.py          a grid document -> `GridSpec` (`build_grid`, `load_grid`)
  spec.py            `GridSpec`, `TrialSpec`, `Problem`
  checks.py          pre-start checks (data, weights, checkpoints, cluster fit)
  plan.py            the dry run's plan
  cost.py            the cost estimate (device-hours, disk)
  results_folder.py  where results go (a folder or an object store: --storage), refused folders, resume
                     compatibility
  state.py           `GridState`, summary.json / summary.csv
  scheduler.py       the dependency-aware Tune searcher and the console callback
  ray_backend.py     Ray start / join, auth, connect deadline, quiet logs
  console.py         the console lines
  driver.py          running a checked grid (Tune experiment, signals, the end)
  runner.py          the run function of a trial (shared by trial.py and ray_ddp.py)
  trial.py           the Tune trainable (pickled by reference: workers import it)
  ray_ddp.py         a trial on N devices (Ray Train + Lightning DDP)
  cli.py             arguments and `main`

The stages themselves (grid block, config class, run function, what they train on) come from
`core.stages`; nothing here compares stage names.

Design:
* The grid file is validated and expanded into trials (with a dependency graph) before Ray starts;
  a malformed file is one line on stderr and exit 2.
* Pre-start checks, before Ray starts or any folder is written (checks.py `pre_start_problems`): the
  grid's per-trial problems (expand.py: image sizes, head / fusion fit, (source, backbone) pairs without
  weights), wandb credentials, the given data folders (layout only, nothing generated), every
  missing weight file when offline (with its fetch command), and, for a local start, whether each
  trial fits this machine (CPUs, GPUs counted by torch; --num-cpus replaces the CPU count). EVERY
  problem is printed, one `twinseg: error: <file>: <where>: <problem>; <fix>` line each on stderr,
  and the exit status is 2. With --address the cluster is only known once Ray is up: that check
  runs after the start (a warning there, the autoscaler may add nodes).
* `--dry-run`: the same checks, then the plan on stdout (one line per trial: id, stage, what it
  depends on, its resources; totals per stage; which cluster size was assumed) and the problems on
  stderr; exit 0 when there is none, 2 otherwise. `--dry-run --json`: the trials (id, stage, depends_on,
  resources, config) and the problems as one JSON document on stdout, the same exit status. It starts no Ray, creates no results folder and
  generates no dataset.
* ONE Tune experiment runs every trial. Its search algorithm is a small dependency-aware scheduler
  (scheduler.py `GridScheduler`, a Tune `Searcher`): whenever Tune asks for a trial, it hands out the next trial
  whose dependencies are done (the one with the longest estimated path to the end of the grid first:
  cost.py's estimates), up to `max_concurrent` at once. A stage-2 trial therefore starts as
  soon as ITS stage-1 trial is done (no barrier between stages), and every trial is a Tune trial
  (an actor with its own resources, listed in the Ray dashboard as `trial <id>`: the trainable's
  `__repr__`, trial.py `make_trainable`).
* A trial whose settings say `devices: N` (N > 1) is the driver of a Ray Train job of N workers
  (Lightning DDP, ray_ddp.py): the Tune trial reserves 0.01 CPU, each worker the
  trial's `resources`; the pre-start check counts N x resources (+ the driver).
* Each trial writes its run folder to `<results>/trials/<id>/`. `metrics.json` present = finished:
  finished trials are never rerun (also under `--resume`); a retried or resumed trial calls the run
  function on the same folder, which resumes from `checkpoints/last.ckpt`.
* Failures: Tune retries a trial `retries` times (FailureConfig.max_failures). A trial that still
  fails is `failed`; every trial depending on it is `skipped` ("dependency <id> failed: <error>").
* `summary.json` / `summary.csv` are rewritten atomically after every trial event (state.py).
* Local start (ray_backend.py): `ray.init` on loopback with the dashboard; Ray's token authentication stays on (Ray
  creates the token in ~/.ray/auth_token); the URL and where the token is are printed at the start
  and the end. `--address` joins an existing cluster instead; before any trial starts, every node must
  see the results storage (ray_backend.py `check_storage_on_nodes`).
"""
