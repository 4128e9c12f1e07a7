"""The two-node Ray cluster of tests/ray_cluster.py (the multi-node tests' fixture), on its own: one
cluster for the module, token authentication on, the worker node with a private results mount.

What it pins down: work lands on the node it is pinned to (custom resource or node affinity); a
file the worker node writes under the private path is invisible to the head and to the driver's
machine view; a job submitted through the dashboard with `ray job submit --working-dir` runs;
the errors Ray gives a driver (`ray.init(address=...)`) and a joining node (`ray start --address`)
that lack the token, which the grid's `--address` message must recognise; and a node whose raylet
is killed is reported dead by Ray. The node-loss test ends the worker node, so it runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.ray_cluster import HEAD_RESOURCE, WORKER_RESOURCE, is_running, ray_cli, two_node_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# A driver that runs one task on every alive node (NodeAffinitySchedulingStrategy, soft=False: the
# storage-probe pattern) writing <private>/<node id>.txt and listing the folder, plus one task placed
# by the worker's custom resource; prints JSON.
PROBE = r"""
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
address, private, worker_resource = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address=address, log_to_driver=False)

@ray.remote(num_cpus=0)
def write_and_list(folder):
    node_id = ray.get_runtime_context().get_node_id()
    with open(os.path.join(folder, node_id + ".txt"), "w") as f:
        f.write(node_id)
    return {"ran_on": node_id, "sees": sorted(os.listdir(folder))}

@ray.remote(num_cpus=0)
def where():
    return ray.get_runtime_context().get_node_id()

alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
by_node = {nid: ray.get(write_and_list.options(
    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nid, soft=False)).remote(private)) for nid in alive}
by_resource = ray.get(where.options(resources={worker_resource: 0.01}).remote())
print(json.dumps({"by_node": by_node, "by_resource": by_resource}))
"""

# A driver that joins by address and reports what ray.init raised: the exception, then its cause chain.
JOIN = r"""
import json, sys
import ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    out = {"joined": True}
except Exception as e:
    chain, c = [], e
    while c is not None:
        chain.append({"type": f"{type(c).__module__}.{type(c).__qualname__}", "text": str(c)})
        c = c.__cause__ or c.__context__
    out = {"joined": False, "chain": chain}
print(json.dumps(out))
"""

JOB = """\
import ray
ray.init()
where = ray.remote(num_cpus=0, resources={"%s": 0.01})(lambda: ray.get_runtime_context().get_node_id())
print("job-ran-on", ray.get(where.remote()), "cwd-has", sorted(__import__("os").listdir(".")))
""" % WORKER_RESOURCE

FAST_JOIN = {"RAY_gcs_server_port_wait_time_s": "2"}  # Ray's GCS connect retries (1 s each; default ~20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    t0 = time.monotonic()
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as c:
        print(f"\ncluster up in {time.monotonic() - t0:.1f} s")
        yield c
    print(f"\ncluster stopped in {c.timings['stop']:.2f} s")


def _no_auth_env(cluster, tmp_path, **extra) -> dict:
    """A driver environment without the auth variables and with an empty HOME (no ~/.ray/auth_token)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return cluster.driver_env(auth=False, HOME=str(home), **extra)


def _join(cluster, env) -> dict:
    r = cluster.run_driver(JOIN, cluster.address, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_alive_nodes_and_the_private_path_is_private(cluster):
    nodes = cluster.wait_nodes(alive=[cluster.head.node_id, cluster.worker.node_id], timeout=30)
    alive = {n["node_id"]: n for n in nodes if n["alive"]}
    assert set(alive) == {cluster.head.node_id, cluster.worker.node_id}
    assert HEAD_RESOURCE in alive[cluster.head.node_id]["resources"]
    assert WORKER_RESOURCE in alive[cluster.worker.node_id]["resources"]
    assert cluster.head.raylet_pid() != cluster.worker.raylet_pid()

    r = cluster.run_driver(PROBE, cluster.address, str(cluster.private_path), WORKER_RESOURCE)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    head, worker = cluster.head.node_id, cluster.worker.node_id
    assert out["by_resource"] == worker
    assert out["by_node"][head]["ran_on"] == head and out["by_node"][worker]["ran_on"] == worker
    # each node sees only its own file: the head the shared folder, the worker its tmpfs
    assert out["by_node"][head]["sees"] == [f"{head}.txt"]
    assert out["by_node"][worker]["sees"] == [f"{worker}.txt"]
    # the driver's machine is the head's: the worker's file is not there
    assert sorted(p.name for p in cluster.private_path.iterdir()) == [f"{head}.txt"]


def test_ray_job_submit_with_the_token(cluster, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "job.py").write_text(JOB)
    cmd = [ray_cli(), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(workdir),
           "--", "python", "job.py"]
    r = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                       env=cluster.driver_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"job-ran-on {cluster.worker.node_id} cwd-has ['job.py']" in r.stdout
    assert "succeeded" in r.stdout


def test_ray_job_submit_without_the_token_is_refused(cluster, tmp_path):
    r = subprocess.run([ray_cli(), "job", "submit", "--address", cluster.dashboard_url, "--no-wait", "--",
                        "python", "-c", "pass"], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                       env=_no_auth_env(cluster, tmp_path))
    text = r.stdout + r.stderr
    assert r.returncode == 1, text[-2000:]
    assert "ray.exceptions.AuthenticationError: Authentication required: Unauthorized: Missing authentication " \
           "token" in text, text[-2000:]


def test_driver_without_the_token_gets_connection_error_caused_by_invalid_auth_token(cluster, tmp_path):
    """`ray.init(address=...)` by a driver with no auth variables: a bare ConnectionError whose
    message names only the address; the token problem is in its cause's text (the GCS client's
    traceback, ending in `ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken ...`),
    and the AuthenticationError object itself is not in the exception chain."""
    out = _join(cluster, _no_auth_env(cluster, tmp_path, **FAST_JOIN))
    assert not out["joined"]
    first, cause = out["chain"][0], out["chain"][1]
    assert first["type"] == "builtins.ConnectionError"
    assert first["text"].startswith("Failed to connect to Ray cluster at ")
    assert "InvalidAuthToken" not in first["text"]
    assert cause["type"] == "builtins.RuntimeError" and cause["text"].startswith("Failed to connect to GCS")
    assert "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: " in cause["text"]
    assert "RAY_AUTH_MODE is currently 'disabled' (not 'token')" in cause["text"]
    assert all(c["type"] != "ray.exceptions.AuthenticationError" for c in out["chain"])


def test_driver_with_a_wrong_token_or_none_at_all(cluster, tmp_path):
    # token mode, wrong token: the same ConnectionError, the cause without the 'disabled' note
    wrong = _no_auth_env(cluster, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token", **FAST_JOIN)
    out = _join(cluster, wrong)
    assert not out["joined"] and out["chain"][0]["type"] == "builtins.ConnectionError"
    assert "InvalidAuthToken: Authentication token is missing or incorrect" in out["chain"][1]["text"]
    assert "currently 'disabled'" not in out["chain"][1]["text"]
    # token mode, no token anywhere (empty HOME): Ray's own AuthenticationError, raised at once
    out = _join(cluster, _no_auth_env(cluster, tmp_path, RAY_AUTH_MODE="token"))
    assert not out["joined"] and out["chain"][0]["type"] == "ray.exceptions.AuthenticationError"
    assert out["chain"][0]["text"].startswith("Token authentication is enabled but no authentication token was found")
    # the token alone, without RAY_AUTH_MODE=token, is not sent: refused like no token at all
    token_only = _no_auth_env(cluster, tmp_path, RAY_AUTH_TOKEN_PATH=str(cluster.token_file), **FAST_JOIN)
    out = _join(cluster, token_only)
    assert not out["joined"] and "currently 'disabled'" in out["chain"][1]["text"]
    # with both, the driver joins
    assert _join(cluster, cluster.driver_env())["joined"]


def test_ray_start_address_without_the_token_fails(cluster, tmp_path):
    """A third node started without the auth variables never joins: `ray start --address` exits 1
    with Ray's RuntimeError('Failed to connect to GCS ...') ending in the InvalidAuthToken line."""
    env = _no_auth_env(cluster, tmp_path, **FAST_JOIN)
    cmd = [ray_cli(), "start", "--address", cluster.address, "--num-cpus", "0", "--temp-dir",
           str(cluster.root / "x"), "--disable-usage-stats", "--block"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:  # it joined after all: stop the node it started, by its group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, text[-2000:]
    assert "RuntimeError: Failed to connect to GCS" in text
    assert "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing or " \
           "incorrect. Note: RAY_AUTH_MODE is currently 'disabled'" in text


def test_killing_the_worker_raylet_marks_the_node_dead(cluster):
    """Runs last: it ends the worker node."""
    raylet = cluster.worker.raylet_pid()
    t0 = time.monotonic()
    os.kill(raylet, signal.SIGKILL)
    nodes = cluster.wait_nodes(alive=[cluster.head.node_id], dead=[cluster.worker.node_id], timeout=120)
    print(f"\nworker node reported dead {time.monotonic() - t0:.1f} s after its raylet was killed")
    state = {n["node_id"]: n["alive"] for n in nodes}
    assert state == {cluster.head.node_id: True, cluster.worker.node_id: False}
    assert not is_running(raylet)
