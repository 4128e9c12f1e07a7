"""A real two-node Ray cluster on one machine, for the multi-node tests: a head and a worker node
started with `ray start --block`, the worker with a PRIVATE folder (its own results disk).

    with two_node_cluster(tmp_dir, private_path=tmp_dir / "results") as cluster:
        cluster.address          # "127.0.0.1:<gcs port>" for `ray.init(address=...)` / `grid.py --address`
        cluster.dashboard_url    # "http://127.0.0.1:<port>" for `ray job submit --address`
        cluster.driver_env()     # os.environ + the token-auth variables every driver / CLI call needs
        cluster.worker.raylet_pid()   # kill it to lose the node mid-run
        cluster.wait_nodes(alive=[cluster.head.node_id], dead=[cluster.worker.node_id])

Layout:
* Head: `ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1`, every listening port
  chosen free (GCS, dashboard, Ray Client server, dashboard agent), custom resource `node_head: 1`.
  Ray maps 127.0.0.1 to the machine's routable address for the node IP it advertises (both nodes
  get the same IP here), and the GCS listens on all interfaces; the dashboard stays on loopback.
* Worker: `unshare -m` (a new mount namespace, mounts private to it) runs a shell that mounts a
  tmpfs over `private_path` and then execs `ray start --address 127.0.0.1:<gcs port> --block`; custom
  resource `node_worker: 1`. What that node's processes write under `private_path` lives in its
  tmpfs: the head, the driver and the test never see it (and it disappears with the node), exactly
  a second machine with its own results disk at the same path.
* Token authentication (Ray's default in 2.60, kept on): a random token in a file under the
  cluster's temp root, and `RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN_PATH=<file>` in the environment of
  both nodes and of every driver (`driver_env()`). Both variables are needed: with the mode unset, a
  process joining an existing cluster by address sends no token (Ray auto-enables token mode only
  for a cluster it starts itself or finds as the local default), and the GCS answers
  `InvalidAuthToken`. The token file keeps the tests away from the user's ~/.ray/auth_token.
* Nodes run with the interpreter's bin folder first on PATH (an activated virtualenv), so a job's
  `python ...` entrypoint is this interpreter.
* Readiness and node death are read from Ray's own state (`ray.nodes()` polled by a driver
  subprocess, the dashboard's /api/version), bounded by a timeout that fails with the nodes' logs.
* Each `ray start` runs in its own process group (start_new_session). `stop()` collects, by process
  id, each node's `ray start`, its descendants (the job drivers Ray starts in their own sessions
  included) and the members of its process group, SIGKILLs them (the cluster state is scratch;
  Ray's graceful SIGTERM path can wait for tens of seconds), and checks that every one is gone.
  Nothing is ever stopped by name.

The drivers run in subprocesses: Ray caches the authentication mode per process, so the test
process itself never connects (nor sets RAY_AUTH_*), and other tests' local Ray instances keep
their own defaults.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tests.s3_server import free_ports

HEAD_RESOURCE, WORKER_RESOURCE = "node_head", "node_worker"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is ~75 MiB; the default (30 % of RAM) per node is far too much
RAY_ENV_DROPPED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

# A driver that joins (retrying until the GCS answers), then polls ray.nodes() until the wanted node
# ids are alive / dead; prints the node table as JSON (exit 0), or the last table on stderr after the
# deadline (exit 3).
_WAIT_NODES = r"""
import json, sys, time, logging
import ray
address, timeout = sys.argv[1], float(sys.argv[4])
alive, dead, alive_resources = (set(json.loads(a)) for a in (sys.argv[2], sys.argv[3], sys.argv[5]))
deadline = time.monotonic() + timeout
while True:  # the head's GCS may not listen yet (ray.init itself gives up after ~20 s)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        break
    except ConnectionError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)  # retry interval, not a wait for a fixed duration
while True:
    nodes = [{"node_id": n["NodeID"], "alive": bool(n["Alive"]), "resources": n.get("Resources", {}),
              "ip": n.get("NodeManagerAddress", ""), "name": n.get("NodeName", "")} for n in ray.nodes()]
    up = {n["node_id"] for n in nodes if n["alive"]}
    down = {n["node_id"] for n in nodes if not n["alive"]}
    up_resources = {r for n in nodes if n["alive"] for r in n["resources"]}
    if alive <= up and dead <= down and alive_resources <= up_resources:
        print(json.dumps(nodes))
        sys.exit(0)
    if time.monotonic() > deadline:
        print(json.dumps(nodes), file=sys.stderr)
        sys.exit(3)
    time.sleep(0.2)  # poll interval of Ray's state, not a wait for a fixed duration
"""


def skip_reason() -> Optional[str]:
    """Why the two-node cluster cannot run here (None when it can): it needs root (the tmpfs mount in
    a private mount namespace), `unshare`, and the `ray` CLI beside this interpreter or on PATH."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the private results mount of the second Ray node needs root (unshare -m + mount -t tmpfs)"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    if ray_cli() is None:
        return "the `ray` command line is not installed"
    probe = tempfile.mkdtemp(prefix="twinseg-mnt-")
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m",
                            "twinseg-probe", probe], capture_output=True, text=True, timeout=30)
    finally:
        os.rmdir(probe)
    if r.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {' '.join(r.stderr.split())[:200]}"
    return None


def ray_cli() -> Optional[str]:
    """The `ray` executable of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("ray")


# --- processes, read from /proc (no psutil in the environment) ------------------------------------

def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, ppid, pgid) of `pid`, or None once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def is_running(pid: int) -> bool:
    """`pid` exists and is not a zombie (a zombie holds no resources; its parent reaps it)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _tree(root: int) -> set[int]:
    """`root`, its descendants, and the members of the process group `root` leads."""
    parent: dict[int, int] = {}
    out = {root}
    for pid in _all_pids():
        st = _stat(pid)
        if st is None:
            continue
        parent[pid] = st[1]
        if st[2] == root:
            out.add(pid)
    grew = True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in out and pid not in out}
        out |= new
        grew = bool(new)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class RayNode:
    """One `ray start --block` process (the leader of its own process group) and what Ray calls it."""

    role: str  # "head" / "worker"
    resource: str  # the custom resource naming this node ({resource: 1})
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    node_id: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def raylet_pid(self) -> int:
        """The pid of this node's raylet (a child of its `ray start`). Killing it loses the node."""
        found = [p for p in _tree(self.pid) if p != self.pid and _comm(p) == "raylet" and is_running(p)]
        if len(found) != 1:
            raise RuntimeError(f"{self.role} node: expected one raylet under pid {self.pid}, found {found}")
        return found[0]

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class TwoNodeCluster:
    head: RayNode
    worker: RayNode
    address: str
    dashboard_url: str
    token_file: Path
    private_path: Path
    root: Path  # temp root: the token file and both nodes' --temp-dir
    env: dict = field(default_factory=dict)  # the environment the nodes run with
    timings: dict = field(default_factory=dict)  # seconds: "start", "stop"

    @property
    def auth_env(self) -> dict:
        """The variables a driver or `ray` CLI call needs to join this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def driver_env(self, auth: bool = True, **extra: str) -> dict:
        """The environment for a driver subprocess: this process's, without any RAY_ADDRESS / RAY_AUTH_*
        it had, plus (auth=True) `auth_env`, plus `extra`."""
        env = {k: v for k, v in self.env.items() if k not in RAY_ENV_DROPPED}
        if auth:
            env.update(self.auth_env)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run_driver(self, code: str, *args: str, auth: bool = True, timeout: float = 120,
                   env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Run `python -c code args...` as a driver of this cluster (cwd: the temp root)."""
        return subprocess.run([sys.executable, "-c", code, *args], cwd=str(self.root), capture_output=True,
                              text=True, timeout=timeout, env=env if env is not None else self.driver_env(auth))

    def wait_nodes(self, alive: Sequence[str] = (), dead: Sequence[str] = (), alive_resources: Sequence[str] = (),
                   timeout: float = 90) -> list[dict]:
        """Block until Ray reports the node ids `alive` alive, `dead` dead, and alive nodes offering
        `alive_resources`; return Ray's node table (node_id, alive, resources, ip, name per node).
        Raises RuntimeError with the table and the nodes' log tails after `timeout` seconds."""
        r = self.run_driver(_WAIT_NODES, self.address, json.dumps(list(alive)), json.dumps(list(dead)),
                            str(timeout), json.dumps(list(alive_resources)), timeout=timeout + 60)
        if r.returncode != 0:
            raise RuntimeError(f"Ray nodes not in the wanted state (alive {list(alive) + list(alive_resources)}, "
                               f"dead {list(dead)}) after {timeout:.0f} s: {r.stderr[-3000:]}\n"
                               f"--- head log:\n{self.head.log_tail()}\n--- worker log:\n{self.worker.log_tail()}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_dashboard(self, timeout: float = 60) -> None:
        """Block until the dashboard answers GET /api/version with the token (HTTP 200)."""
        deadline = time.monotonic() + timeout
        req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {self.token}"})
        last = ""
        while time.monotonic() < deadline:
            if self.head.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.2)  # poll interval, not a wait for a fixed duration
        raise RuntimeError(f"Ray dashboard {self.dashboard_url} not answering after {timeout:.0f} s ({last}):\n"
                           f"{self.head.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGKILL, by pid, every process each node started (worker first), then check they are gone;
        remove the temp root. Raises RuntimeError naming any process still running after `timeout`."""
        t0 = time.monotonic()
        pids: set[int] = set()
        for node in (self.worker, self.head):
            tree = _tree(node.pid)
            pids |= tree
            for pid in sorted(tree):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for node in (self.worker, self.head):
            node.process.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        left = [p for p in pids if is_running(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval until the kernel has torn the killed processes down
            left = [p for p in left if is_running(p)]
        shutil.rmtree(self.root, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - t0
        if left:
            raise RuntimeError(f"Ray processes still running after SIGKILL: "
                               f"{[(p, _comm(p)) for p in sorted(left)]}")


def _node_env(token_file: Path, extra: Optional[dict]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_DROPPED}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _start(role: str, cmd: list[str], env: dict, log: Path, resource: str, temp_dir: Path) -> RayNode:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(log.parent), start_new_session=True)
    return RayNode(role, resource, proc, temp_dir, log)


def start_two_node_cluster(private_path: Path, num_cpus: int = 1, worker_cpus: Optional[int] = None,
                           node_env: Optional[dict] = None, ready_timeout: float = 120,
                           tmpfs_size: str = "512m") -> TwoNodeCluster:
    """Start the head, then the worker (a tmpfs over `private_path` in its own mount namespace);
    return once Ray reports both nodes alive with their resources and the dashboard answers.
    `node_env`: extra environment for both nodes (e.g. RAY_health_check_* settings).
    Raises RuntimeError (with the logs) when the cluster is not up within `ready_timeout` s."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    ray = ray_cli()
    private_path = Path(private_path)
    private_path.mkdir(parents=True, exist_ok=True)
    # Short root: Ray's unix sockets live under <temp-dir>/session_<date>_<pid>/sockets/ (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = _node_env(token_file, node_env)
    gcs, dash, client, head_agent, worker_agent = free_ports(5)
    common = ["--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
              "--disable-usage-stats", "--block"]
    t0 = time.monotonic()
    head_cmd = [ray, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dash), "--include-dashboard", "true", "--ray-client-server-port", str(client),
                "--dashboard-agent-listen-port", str(head_agent), "--num-cpus", str(num_cpus),
                "--resources", json.dumps({HEAD_RESOURCE: 1}), "--temp-dir", str(root / "h"), *common]
    head = _start("head", head_cmd, env, root / "head.log", HEAD_RESOURCE, root / "h")
    # `unshare -m` execs (no fork): the worker's `ray start` keeps the pid Popen returns.
    mount_then_exec = 'mount -t tmpfs -o "size=$1,mode=0755" twinseg-private "$2" && shift 2 && exec "$@"'
    worker_cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount_then_exec, "sh", tmpfs_size,
                  str(private_path), ray, "start", "--address", f"127.0.0.1:{gcs}",
                  "--dashboard-agent-listen-port", str(worker_agent),
                  "--num-cpus", str(worker_cpus if worker_cpus is not None else num_cpus),
                  "--resources", json.dumps({WORKER_RESOURCE: 1}), "--temp-dir", str(root / "w"), *common]
    # The worker can only join once the head's GCS is up; `ray start --address` retries for ~20 s,
    # so start it at once and let Ray wait.
    worker = _start("worker", worker_cmd, env, root / "worker.log", WORKER_RESOURCE, root / "w")
    cluster = TwoNodeCluster(head, worker, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", token_file,
                             private_path, root, env)
    try:
        for node in (head, worker):
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.role} `ray start` exited with {node.process.returncode}:\n{node.log_tail()}")
        nodes = cluster.wait_nodes(alive_resources=[HEAD_RESOURCE, WORKER_RESOURCE], timeout=ready_timeout)
        for node in (head, worker):
            node.node_id = next(n["node_id"] for n in nodes if n["alive"] and node.resource in n["resources"])
        cluster.wait_dashboard(timeout=max(10.0, ready_timeout - (time.monotonic() - t0)))
    except BaseException:
        cluster.stop()
        raise
    cluster.timings["start"] = time.monotonic() - t0
    return cluster


@contextmanager
def two_node_cluster(tmp_path: Path, private_path: Optional[Path] = None, **kw) -> Iterator[TwoNodeCluster]:
    """Context manager around `start_two_node_cluster` (private path default: tmp_path / "results");
    skips the calling test (pytest.skip, with the reason) where the cluster cannot run."""
    reason = skip_reason()
    if reason:
        import pytest

        pytest.skip(reason)
    cluster = start_two_node_cluster(Path(private_path) if private_path else Path(tmp_path) / "results", **kw)
    try:
        yield cluster
    finally:
        cluster.stop()
