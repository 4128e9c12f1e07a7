"""Ray for the grid: the local start (a NEW instance, dashboard on loopback, Ray's token authentication
left on) or joining a cluster (`--address`, with a connection deadline), the workers' environment, the
dashboard line (never the token itself), quiet Tune logs, and, once Ray is up, the cluster-fit check and
the storage check on every node (`check_storage_on_nodes`)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import ConfigError, TwinsegError
from experiments.engine.checks import cluster_fit_problem
from experiments.engine.console import Console
from experiments.engine.spec import GridSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the driver of a Ray Job (`ray job submit`): its runtime_env and metadata."""


def ray_job_runtime_env(env: Optional[dict] = None) -> Optional[dict]:
    """The runtime_env of the Ray Job this driver runs as (`ray job submit`), or None outside a job."""
    import json

    text = (os.environ if env is None else env).get(JOB_CONFIG_ENV)
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    rt = doc.get("runtime_env") if isinstance(doc, dict) else None
    return rt if isinstance(rt, dict) else {}


def job_working_dir_problem(results_local: Path) -> Optional[str]:
    """One line when this driver is a Ray Job's with a --working-dir (it runs in a temporary unpacked copy
    of it, the current folder) and the local results folder `results_local` lies inside that copy (a
    relative --output or the default results/): the results would vanish with it."""
    rt = ray_job_runtime_env()
    if not rt or not rt.get("working_dir"):
        return None
    here = Path.cwd().resolve()
    folder = Path(results_local).resolve()
    if folder != here and here not in folder.parents:
        return None
    return (f"results folder {folder}: this grid runs as a Ray Job whose driver works in a temporary copy of "
            f"--working-dir ({here}), removed with the job; pass --storage s3://bucket/prefix or an absolute "
            "--output on a disk every node mounts")


SECRET_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")
"""A TWINSEG_* variable whose name holds one of these is never passed to the Ray job."""


def worker_env(max_concurrent: int) -> dict:
    """Set the driver's Ray / Tune / wandb environment and return the env vars of the Ray job (its
    runtime_env with --address): the repo on PYTHONPATH (the workers import experiments.engine.trial,
    the Tune trainable, by module path) and the project's TWINSEG_* settings (e.g. the data cache), by
    name, none that looks secret (`SECRET_NAME_PARTS`). Secrets (WANDB_API_KEY, AWS_* credentials) are
    never put into the Ray job config (Ray stores it, and Tune pickles its state into the results
    folder): every node reads them from its own environment (the one its `ray start` ran in)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune creates one pending trial at a time for custom searchers; allow max_concurrent at once.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max_concurrent))
    os.environ["WANDB_SILENT"] = "true"
    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([pp] if pp else []))
    env_vars = {"PYTHONPATH": os.environ["PYTHONPATH"], "WANDB_SILENT": "true"}
    for k, v in os.environ.items():
        if k.startswith("TWINSEG_") and not any(part in k for part in SECRET_NAME_PARTS):
            env_vars[k] = v
    # In a Ray Job, the job's own env_vars reach every worker already; Ray refuses a ray.init runtime_env
    # naming one of them again (a merge conflict), and its working_dir is on every worker's path.
    job_vars = (ray_job_runtime_env() or {}).get("env_vars") or {}
    return {k: v for k, v in env_vars.items() if k not in job_vars}


def _token_hint() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "in $RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"in {os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = f"in {Path.home() / '.ray' / 'auth_token'}"
    return f"token auth on: the page asks for the token, stored {where} (print it with `ray get-auth-token`)"


def dashboard_line(url: str, auth_mode: Optional[str]) -> str:
    """The dashboard line printed at the start and the end (never prints the token itself)."""
    if not url:
        return "dashboard: not running (Ray started without it); progress is in this console and summary.json"
    if not url.startswith("http"):
        url = f"http://{url}"
    if (auth_mode or "").lower() == "token":
        return f"dashboard: {url} ({_token_hint()})"
    return (f"dashboard: {url} (WARNING: token authentication is disabled (RAY_AUTH_MODE={auth_mode}); "
            "unset RAY_AUTH_MODE to let Ray protect the dashboard)")


class RayStartError(TwinsegError):
    """Ray itself could not start (one line instead of Ray's traceback)."""

    exit_code = 1


class _QuietTune:
    """logging filter: drop Tune's own per-trial error tracebacks and end-of-run noise (this driver
    prints one line per trial event; the full traceback is in trials/<id>/error.log)."""

    DROP = ("Trial task failed for trial", "Trials did not complete", "Failed to fetch metrics",
            "save not implemented for Searcher")

    def filter(self, record) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        return not any(d in msg for d in self.DROP)


def quiet_tune_logs() -> None:
    import logging

    f = _QuietTune()
    for name in ("ray", ""):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(x, _QuietTune) for x in h.filters):
                h.addFilter(f)


RAY_CONNECT_TIMEOUT_S = float(os.environ.get("TWINSEG_RAY_CONNECT_TIMEOUT", "60"))
"""Seconds a connection to a Ray cluster (`--address`) may take before the grid gives up with one line
(env TWINSEG_RAY_CONNECT_TIMEOUT); Ray's own client would retry for minutes."""


def probe_address(address: str, timeout: float) -> None:
    """A TCP connection to HOST:PORT of `--address` (ray://HOST:PORT too) within `timeout` seconds, or
    one ConfigError line. `auto` and other forms without a port are left to Ray (and its deadline)."""
    addr = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10.0)):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or type(e).__name__)
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster ({why}); check the address "
                          "(ray status on the head node prints it) and that the port is open") from None


def with_deadline(fn: Callable[[], Any], timeout: float, message: str) -> Any:
    """`fn()` (in this thread: ray.init wants the main thread) watched by a timer: after `timeout`
    seconds without an answer the driver prints `message` as one line and exits 2 at once (a hung
    connection cannot be cancelled politely)."""

    def give_up() -> None:
        print(f"twinseg: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        timer.cancel()


def local_ray_init_kwargs(num_cpus: Optional[int], common: Optional[dict] = None) -> dict:
    """`ray.init` arguments for the grid's own local instance: a NEW instance (never joins a cluster
    started elsewhere) whose dashboard listens on loopback only (127.0.0.1, never 0.0.0.0)."""
    return dict(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", **(common or {}))


def start_ray(args, console: Console, env_vars: dict) -> str:
    import logging

    import ray

    common = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if args.address:
        probe_address(args.address, RAY_CONNECT_TIMEOUT_S)
        try:
            ctx = with_deadline(lambda: ray.init(address=args.address, runtime_env={"env_vars": env_vars}, **common),
                                RAY_CONNECT_TIMEOUT_S,
                                f"--address {args.address}: the Ray cluster did not answer within "
                                f"{RAY_CONNECT_TIMEOUT_S:.0f} s; check the address (ray status on the head node), "
                                "the network and the auth token")
        except TwinsegError:
            raise
        except Exception as e:  # noqa: BLE001 - any connection problem is a user error here
            auth = auth_problem(e)
            if auth:
                raise ConfigError(f"--address {args.address}: the Ray cluster refused this driver's token "
                                  f"authentication; {auth}") from None
            raise ConfigError(f"--address {args.address}: cannot join the Ray cluster ({' '.join(str(e).split())[:300]}); "
                              "check the address (ray status on the head node) and the auth token") from None
        return getattr(ctx, "dashboard_url", "") or ""
    # A NEW local instance ("local": never silently join a cluster started by `ray start`), dashboard on
    # loopback only. Token authentication: Ray 2.60 turns it on for new local clusters (RAY_AUTH_MODE
    # unset) and creates the token in ~/.ray/auth_token. Do not set RAY_AUTH_MODE here: Ray caches
    # the mode at import, and only its own default path refreshes that cache.
    kw = local_ray_init_kwargs(args.num_cpus, common)

    def _init(include_dashboard: bool):
        try:
            return ray.init(include_dashboard=include_dashboard, **kw)
        except Exception as e:  # noqa: BLE001
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            raise RayStartError(f"could not start a local Ray instance ({' '.join(str(e).split())[:300]}); "
                                "see the logs under /tmp/ray/session_latest/logs") from None

    if args.no_dashboard:
        _init(False)
        return ""
    try:
        ctx = _init(True)
    except RayStartError as e:  # missing dashboard dependencies and the like: go on without it
        console.line(f"dashboard: could not start ({str(e)[:200]}); continuing without it", "yellow")
        _init(False)
        return ""
    url = getattr(ctx, "dashboard_url", "") or ""
    if not url:
        console.line("dashboard: could not start (missing dashboard dependencies?); continuing without it", "yellow")
    return url


def auth_problem(e: BaseException, env: Optional[dict] = None) -> Optional[str]:
    """What to set when `ray.init(address=...)` failed on token authentication (None for other errors).
    Ray 2.60 raises ConnectionError whose cause's TEXT holds `InvalidAuthToken` (the AuthenticationError
    object is not in the chain), or AuthenticationError itself when token mode has no token at all."""
    seen, link, found = set(), e, False
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if type(link).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(link):
            found = True
            break
        link = link.__cause__ or link.__context__
    if not found:
        return None
    env = os.environ if env is None else env
    if (env.get("RAY_AUTH_MODE") or "").lower() != "token":
        return ("set RAY_AUTH_MODE=token and the cluster's token (the head's ~/.ray/auth_token copied to this "
                "machine, RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN=TOKEN), then run again")
    if not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        return ("RAY_AUTH_MODE=token but no token was found: copy the head's ~/.ray/auth_token here, or set "
                "RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN=TOKEN")
    return ("the token this driver sent is not the cluster's: use the head's token (ray get-auth-token on the "
            "head) in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")


STORAGE_PROBE_TIMEOUT_S = 120.0
"""Seconds the storage probe on every node may take (a node's task waits for a worker process)."""


def node_identity() -> dict:
    """Where this process runs: hostname, IP and Ray node id (None outside Ray)."""
    info = {"hostname": socket.gethostname(), "ip": None, "node_id": None}
    try:
        import ray

        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
            info["ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - identity is informative only
        pass
    return info


def probe_storage(uri: str, name: str, token: str) -> dict:
    """On one node: read the driver's probe file `name` under the storage `uri` (it must hold `token`),
    then write `<name>.<node id>` for the driver to read back. Returns this node's identity with `seen`
    (the driver's probe was readable) and `error` (one line, or None)."""
    from core.errors import StorageError
    from core.storage import Storage

    me = node_identity()
    try:
        store = Storage(uri)
        try:
            me["seen"] = store.read_text(name) == token
        except FileNotFoundError:
            me["seen"] = False
        if me["seen"]:
            store.write_text(f"{name}.{me['node_id']}", token)
        me["error"] = None
    except StorageError as e:
        me["seen"], me["error"] = False, str(e)
    except Exception as e:  # noqa: BLE001 - reported as the node's problem, one line
        me["seen"], me["error"] = False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return me


def check_storage_on_nodes(results, timeout: float = STORAGE_PROBE_TIMEOUT_S) -> None:
    """Before any trial starts: one small task on every alive node (NodeAffinitySchedulingStrategy,
    num_cpus=0, so it runs while trials hold every CPU) reads a probe the driver wrote under the results
    storage and writes one back, which the driver reads. The first node that cannot see the results
    folder is one ConfigError line (exit 2). Nodes are told apart by Ray node id (nodes on one machine
    report the same IP)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store = results.storage
    name, token = f".node-probe-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    store.write_text(name, token)
    try:
        remote = ray.remote(num_cpus=0, max_retries=0)(probe_storage)
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nid, soft=False),
                               name="storage probe").remote(store.join(), name, token) for nid in alive]
        try:
            answers = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"the storage check of {store.join()} on {len(alive)} node(s) did not finish within "
                              f"{timeout:.0f} s; check that every node is alive (ray status)") from None
        for a in answers:
            node = f"{a.get('ip')} ({a.get('hostname')})"
            back = a["seen"] and store.exists(f"{name}.{a.get('node_id')}")
            if back:
                continue
            if a.get("error") and not results.storage.is_local:
                raise ConfigError(f"storage {store.join()} is not usable from node {node}: {a['error']}")
            what = f"results folder {store.join()}" if store.is_local else f"storage {store.join()}"
            fix = ("use a folder every node mounts, or --storage s3://..." if store.is_local else
                   "give every node the same storage settings (AWS_* environment)")
            raise ConfigError(f"{what} is not visible from node {node}: {fix}")
    finally:
        for f in store.list("", recursive=False):
            if f.startswith(name):
                store.delete(f)


def check_cluster_fits(spec: GridSpec, strict: bool) -> None:
    import ray

    total = ray.cluster_resources()
    problem = cluster_fit_problem(spec, float(total.get("CPU", 0)), float(total.get("GPU", 0)))
    if problem:
        if strict:
            raise ConfigError(f"{spec.path.name}: {problem}")
        print(f"twinseg: warning: {problem} (waiting for the autoscaler)", file=sys.stderr)
