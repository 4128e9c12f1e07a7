"""Where results live: a local or shared folder, or an object store, behind one small interface.

    storage = Storage("s3://bucket/prefix")      # or "/shared/results", "file:///x", "gs://bucket/prefix"
    storage.check()                              # one StorageError line before anything runs
    run = storage.child("trials", trial_id)      # a run folder's prefix
    token = run.claim(owner="trial")             # this attempt is the folder's one writer
    run.persist_run(scratch, token=token)                # at a checkpoint save: all but metrics.json
    run.persist_run(scratch, final=True, token=token)    # at the end: artifacts, then metrics.json LAST
    RunPersister(run, scratch, token=token)              # the same off the training loop: .save(), .finish()
    run.fetch_run(scratch)                       # a retry on another node resumes from the checkpoint
    run.read_metrics()                           # the finished result, or None

The filesystem layer is `pyarrow.fs`, the one Ray uses for `storage_path`
(ray/train/_internal/storage.py `get_fs_and_path` -> `pyarrow.fs.FileSystem.from_uri`); no S3 client of
our own. URIs: a path or `file://` (local or shared folder: writes are atomic through `core.io`),
`s3://bucket[/prefix]` (AWS or any S3-compatible server: MinIO, SeaweedFS, Ceph), `gs://bucket[/prefix]`
(where the pyarrow build has GCS). Paths given to the methods are relative to the URI ("" is its root).

S3 settings come from the standard environment (the `env` mapping, default `os.environ`):
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (an S3-compatible server; `http://` or `https://`),
`AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), `AWS_DEFAULT_REGION` /
`AWS_REGION` (default `us-east-1` with an endpoint). Without explicit keys the SDK's default chain is used
(`AWS_PROFILE`, the shared credentials file, web identity, container credentials; on AWS itself also the
instance role); with an endpoint and none of these, `check()` says credentials are missing instead of
letting the SDK wait on the instance metadata service. `check()` runs with a 3 s connect timeout and no
retry; data transfers with the SDK's standard retries.

Finished = `metrics.json` (`core.io.METRICS_FILE`), on storage as on disk: `persist_run(final=True)`
uploads every other file first and `metrics.json` last, so a prefix without it is not a result.
One object PUT is atomic, but pyarrow cannot abort an upload: an exception (SIGTERM, a read error) in the
middle of a file completes it with what was sent, so the partial object is deleted at once; a killed
process leaves the old object (an unfinished multipart upload is never visible). A checkpoint cut that way
is gone rather than truncated (the run restarts from scratch; `core.runs.common.usable_checkpoint` sets
aside a truncated one anyway). `read_metrics` raises StorageError when the store cannot be read: an
unreachable store never reads as "unfinished".

One writer per run folder: a local folder has `core.folder_lock` (fcntl); an object store has no lock, so
each attempt claims the folder with a token: `claim()` PUTs `<run>/.attempt` = {token, owner, host, pid,
started} (the last claimant wins), and `persist_run(token=)` re-reads it before it writes anything and
again just before `metrics.json`: an attempt whose token is no longer the current one (a retry on another
node took over, or the folder was cleared) gets a StorageError and writes no finished marker. The window
left (a claim landing between that read and the PUT of metrics.json) can only let the superseded attempt
write a result of the same config, which the finished = same config rule accepts. The grid driver claims
the results root the same way (`claim(owner="grid driver")`) next to its local `folder_lock`.
`.attempt`, `.lock` and `core.io` temp files never travel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Optional
from urllib.parse import urlparse

from core.errors import StorageError
from core.folder_lock import LOCK_FILE
from core.io import METRICS_FILE, atomic_write, atomic_write_bytes

ATTEMPT_FILE = ".attempt"
CHUNK = 8 * 2**20
SCHEMES = ("s3", "gs", "file")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_CREDENTIAL_SOURCES = ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                       "AWS_CONTAINER_CREDENTIALS_FULL_URI")
_HOW = "pass a local path, s3://bucket/prefix or gs://bucket/prefix"


def parse_uri(uri) -> tuple[str, Optional[str], str]:
    """(scheme, bucket, filesystem path) of a storage URI: ('local', None, '/abs/path') or
    ('s3' | 'gs', bucket, 'bucket/prefix'). A bad URI is one StorageError line."""
    text = str(uri).strip()
    if not text:
        raise StorageError(f"empty storage URI; {_HOW}")
    if "://" not in text:
        return "local", None, os.path.abspath(os.path.expanduser(text))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"storage URI {text!r}: unsupported scheme {scheme + '://'!r}; {_HOW}")
    if parsed.query or parsed.fragment:
        raise StorageError(f"storage URI {text!r}: query or fragment not supported; set the endpoint with "
                           "AWS_ENDPOINT_URL and pass s3://bucket/prefix")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise StorageError(f"storage URI {text!r}: a file URI is file:///absolute/path")
        return "local", None, os.path.abspath(parsed.path)
    bucket = parsed.netloc
    if not bucket:
        raise StorageError(f"storage URI {text!r} names no bucket; write {scheme}://bucket/prefix")
    if not _BUCKET.match(bucket):
        raise StorageError(f"storage URI {text!r}: {bucket!r} is not a valid bucket name (3-63 lowercase "
                           "letters, digits, '.', '-', '_'); fix the bucket in the URI")
    prefix = "/".join(p for p in parsed.path.split("/") if p)
    if any(p in (".", "..") for p in prefix.split("/")):
        raise StorageError(f"storage URI {text!r}: '.' and '..' are not allowed in an object prefix")
    return scheme, bucket, f"{bucket}/{prefix}" if prefix else bucket


def _clean_rel(rel: str) -> str:
    parts = [p for p in PurePosixPath(str(rel)).parts if p not in ("", "/", ".")]
    if ".." in parts:
        raise ValueError(f"storage paths are relative to the storage root, without '..': {rel!r}")
    return "/".join(parts)


def _join(*parts: str) -> str:
    return "/".join(p for p in (_clean_rel(x) for x in parts) if p)


def _travels(rel: str) -> bool:
    """Whether a run-folder file is persisted: not the node-local lock, not the attempt token, not a
    core.io temp file ('.<name>.<random>.tmp...') of a write in progress."""
    name = rel.rsplit("/", 1)[-1]
    return name not in (LOCK_FILE, ATTEMPT_FILE) and not (name.startswith(".") and ".tmp" in name)


def local_files(folder: Path) -> list[str]:
    """Every file under `folder` that travels (relative posix paths, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and _travels(p.relative_to(folder).as_posix()))


class Storage:
    """A parsed storage URI over a `pyarrow.fs` filesystem (module docstring)."""

    def __init__(self, uri, env: Optional[Mapping[str, str]] = None):
        self.uri = str(uri).strip()
        self.scheme, self.bucket, self.root = parse_uri(self.uri)
        self._env = dict(os.environ if env is None else env)
        self._fs = None
        self._sent: dict[str, tuple[int, int]] = {}  # fs path -> (size, mtime_ns) of the file uploaded there
        self._cleared: set[str] = set()

    # ----- naming
    @property
    def is_local(self) -> bool:
        return self.scheme == "local"

    def __repr__(self) -> str:
        return f"Storage({self.join()!r})"

    def join(self, *parts: str) -> str:
        """The full URI (a path for local storage) of `parts` under the root."""
        rel = _join(*parts)
        if self.is_local:
            return os.path.join(self.root, *rel.split("/")) if rel else self.root
        return f"{self.scheme}://{self.root}/{rel}" if rel else f"{self.scheme}://{self.root}"

    def child(self, *parts: str) -> "Storage":
        """The storage rooted at `parts` under this root (same filesystem, environment, upload record)."""
        sub = object.__new__(Storage)
        sub.__dict__.update(self.__dict__)
        rel = _join(*parts)
        sub.root = (os.path.join(self.root, *rel.split("/")) if self.is_local else f"{self.root}/{rel}") if rel \
            else self.root
        sub.uri = sub.join()
        return sub

    def _path(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        if not rel:
            return self.root
        return os.path.join(self.root, *rel.split("/")) if self.is_local else f"{self.root}/{rel}"

    # ----- the filesystem
    def _endpoint(self) -> Optional[str]:
        return self._env.get("AWS_ENDPOINT_URL_S3") or self._env.get("AWS_ENDPOINT_URL") or None

    def _s3_credentials(self) -> dict:
        ak, sk = self._env.get("AWS_ACCESS_KEY_ID"), self._env.get("AWS_SECRET_ACCESS_KEY")
        if ak and sk:
            token = self._env.get("AWS_SESSION_TOKEN")
            return {"access_key": ak, "secret_key": sk, **({"session_token": token} if token else {})}
        if ak or sk:
            have, lack = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if ak else ("AWS_SECRET_ACCESS_KEY",
                                                                                    "AWS_ACCESS_KEY_ID")
            raise StorageError(f"{have} is set but {lack} is not, for {self.join()}; set both")
        shared = self._env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
            self._env.get("HOME") or os.path.expanduser("~"), ".aws", "credentials")
        if any(self._env.get(k) for k in _CREDENTIAL_SOURCES) or os.path.isfile(shared):
            return {}  # the SDK's default chain reads them
        if self._endpoint() or self._env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            where = f" at {self._endpoint()}" if self._endpoint() else ""
            raise StorageError(f"no S3 credentials for {self.join()}{where}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of every node")
        return {}  # on AWS an instance role may supply them

    def _make_fs(self, probe: bool = False):
        from pyarrow import fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem()
        if self.scheme == "gs":
            from datetime import timedelta

            if not hasattr(pafs, "GcsFileSystem"):
                raise StorageError(f"{self.join()}: this pyarrow build has no GCS support; use s3:// (GCS has "
                                   "an S3-compatible endpoint: AWS_ENDPOINT_URL=https://storage.googleapis.com "
                                   "with HMAC keys) or a shared path")
            return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=10 if probe else 300))
        kw = self._s3_credentials()
        endpoint = self._endpoint()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError(f"AWS_ENDPOINT_URL={endpoint!r} is not an http(s) URL; write e.g. "
                                   "http://host:9000")
            kw.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        region = self._env.get("AWS_DEFAULT_REGION") or self._env.get("AWS_REGION") or ("us-east-1" if endpoint
                                                                                        else None)
        if region:
            kw["region"] = region
        if probe:
            kw.update(connect_timeout=3, request_timeout=10,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        else:
            kw.update(connect_timeout=10, request_timeout=120)
        return pafs.S3FileSystem(**kw)

    @property
    def fs(self):
        if self._fs is None:
            self._fs = self._make_fs()
        return self._fs

    # ----- errors
    def _explain(self, e: BaseException, action: str, rel: str = "") -> StorageError:
        """One StorageError line for a failed storage call."""
        text = " ".join(str(e).split())
        where = self.join(rel)
        if self.is_local:
            return StorageError(f"cannot {action} {where}: {text}; check the path and its permissions")
        endpoint = self._endpoint()
        at = f" at {endpoint}" if endpoint else ""
        key = self._env.get("AWS_ACCESS_KEY_ID", "")
        detail = text.split("operation: ", 1)[-1][:160]
        if any(s in text for s in ("NETWORK_CONNECTION", "curlCode", "connect to", "Connection refused",
                                   "REQUEST_TIMEOUT", "timed out", "Timeout")):
            return StorageError(f"cannot reach the object store{at} to {action} {where} ({detail}); check "
                                "AWS_ENDPOINT_URL and that the server is up and reachable from this node")
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            return StorageError(f"bucket '{self.bucket}' does not exist{at}; create it (e.g. aws s3 mb "
                                f"s3://{self.bucket}) or fix the storage URI {self.uri}")
        if "SIGNATURE_DOES_NOT_MATCH" in text or "SignatureDoesNotMatch" in text:
            return StorageError(f"the object store{at} rejected the signature of access key '{key}' to {action} "
                                f"{where}: AWS_SECRET_ACCESS_KEY does not match that key; set the right secret")
        if "INVALID_ACCESS_KEY_ID" in text or "InvalidAccessKeyId" in text:
            return StorageError(f"the object store{at} does not know the access key '{key}' "
                                "(AWS_ACCESS_KEY_ID); set a valid key and its secret")
        if "ACCESS_DENIED" in text or "AccessDenied" in text or "Forbidden" in text:
            return StorageError(f"access denied{at} to {action} {where} (access key '{key}'); check "
                                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's permissions on bucket "
                                f"'{self.bucket}'")
        return StorageError(f"cannot {action} {where}{at}: {text[:200]}; check the storage URI and the AWS_* "
                            "settings")

    def _call(self, action: str, rel: str, fn: Callable, *args, **kw):
        """`fn(*args, **kw)` with storage failures turned into one StorageError line; FileNotFoundError
        passes through (callers decide what a missing file means)."""
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise
        except StorageError:
            raise
        except OSError as e:
            raise self._explain(e, action, rel) from None

    # ----- single files
    def exists(self, rel: str = "") -> bool:
        return self._call("look up", rel, self.fs.get_file_info, self._path(rel)).type.name != "NotFound"

    def read_bytes(self, rel: str) -> bytes:
        def read():
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read()

        return self._call("read", rel, read)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def _put(self, rel: str, fill: Callable[[object], None]) -> None:
        """Create the object `rel` with `fill(stream)`; on any failure the partial object pyarrow leaves
        behind (it completes an upload on close, it cannot abort one) is deleted."""
        path = self._path(rel)
        out = self._call("write", rel, self.fs.open_output_stream, path)
        try:
            fill(out)
        except BaseException:
            try:
                out.close()
                self.fs.delete_file(path)
            except OSError:
                pass
            raise
        self._call("write", rel, out.close)

    def write_bytes(self, rel: str, data) -> None:
        """Write `rel` whole: atomically on a local path (core.io), one PUT on an object store."""
        if self.is_local:
            self._call("write", rel, atomic_write_bytes, Path(self._path(rel)), data, what=rel)
        else:
            self._put(rel, lambda out: out.write(data))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj, default=None) -> None:
        """Indented JSON plus a final newline, as `core.io.atomic_write_json` writes it."""
        self.write_text(rel, json.dumps(obj, indent=2, default=default) + "\n")

    def upload_file(self, local, rel: str) -> None:
        local = Path(local)
        st = local.stat()  # before reading: a file replaced meanwhile has a newer mtime and goes again
        if self.is_local:
            self._call("write", rel, atomic_write, Path(self._path(rel)), lambda tmp: shutil.copyfile(local, tmp),
                       what=rel)
        else:
            def fill(out):
                with open(local, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)

            self._put(rel, fill)
        self._sent[self._path(rel)] = (st.st_size, st.st_mtime_ns)

    def download_file(self, rel: str, local) -> Path:
        """Copy `rel` to the local file `local`, atomically (core.io)."""
        def fill(tmp: str) -> None:
            with self.fs.open_input_stream(self._path(rel)) as src, open(tmp, "wb") as dst:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    dst.write(chunk)

        return self._call("download", rel, atomic_write, Path(local), fill, what=rel)

    def delete(self, rel: str = "") -> None:
        """Delete the file or the whole folder / prefix `rel` (missing: nothing to do)."""
        from pyarrow import fs as pafs

        path = self._path(rel)
        info = self._call("look up", rel, self.fs.get_file_info, path)
        if info.type == pafs.FileType.File:
            self._call("delete", rel, self.fs.delete_file, path)
        elif info.type == pafs.FileType.Directory and not self.is_local and path == self.bucket:
            self._call("delete", rel, self.fs.delete_dir_contents, path, missing_dir_ok=True)  # keep the bucket
        elif info.type == pafs.FileType.Directory:
            self._call("delete", rel, self.fs.delete_dir, path)

    def list(self, rel: str = "", recursive: bool = True) -> list[str]:
        """The files under `rel` (relative posix paths, sorted); [] when there is none."""
        from pyarrow import fs as pafs

        base = self._path(rel)
        infos = self._call("list", rel, self.fs.get_file_info,
                           pafs.FileSelector(base, allow_not_found=True, recursive=recursive))
        base_posix = base.replace(os.sep, "/") if self.is_local else base
        out = []
        for info in infos:
            if info.type == pafs.FileType.File:
                out.append(info.path.replace(os.sep, "/")[len(base_posix) + 1:] if self.is_local
                           else info.path[len(base) + 1:])
        return sorted(out)

    def list_dirs(self, rel: str = "") -> list[str]:
        """The names of the folders directly under `rel` (sorted); [] when there is none. On an object store a
        folder is a common prefix of objects."""
        from pyarrow import fs as pafs

        infos = self._call("list", rel, self.fs.get_file_info,
                           pafs.FileSelector(self._path(rel), allow_not_found=True, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    # ----- folders
    def _unchanged(self, local: Path, rel: str) -> bool:
        st = local.stat()
        return self._sent.get(self._path(rel)) == (st.st_size, st.st_mtime_ns)

    def upload_dir(self, local, rel: str = "", skip: Optional[Callable[[str], bool]] = None,
                   changed_only: bool = False, progress: Optional[Callable[[str], None]] = None) -> list[str]:
        """Upload the travelling files of the local folder `local` under `rel` (sorted; `skip(relpath)`
        -> True leaves one out; `changed_only`: files this object already uploaded unchanged are left
        out). `progress(relpath)` is called before each upload. Returns the uploaded relative paths."""
        local = Path(local)
        sent = []
        for f in local_files(local):
            if (skip and skip(f)) or (changed_only and self._unchanged(local / f, _join(rel, f))):
                continue
            if progress:
                progress(f)
            self.upload_file(local / f, _join(rel, f))
            sent.append(f)
        return sent

    def download_dir(self, rel: str, local, skip: Optional[Callable[[str], bool]] = None) -> list[str]:
        """Download the travelling files under `rel` into the local folder `local`; returns them."""
        got = []
        for f in self.list(rel):
            if _travels(f) and not (skip and skip(f)):
                self.download_file(_join(rel, f), Path(local) / f)
                got.append(f)
        return got

    def _same_folder(self, rel: str, local) -> bool:
        return self.is_local and os.path.realpath(self._path(rel)) == os.path.realpath(str(local))

    # ----- run folders
    def persist_run(self, local_run_dir, rel: str = "", *, final: bool = False, token: Optional[str] = None,
                    progress: Optional[Callable[[str], None]] = None) -> list[str]:
        """Copy a run folder (node-local scratch) to `rel`. Not `final` (at a checkpoint save): every
        changed file but metrics.json. `final`: every changed file, then metrics.json LAST, then the
        files the run deleted (e.g. checkpoints/last.ckpt) are deleted on storage too. With `token`,
        an attempt that is no longer the folder's claimant gets a StorageError and writes nothing more.
        A no-op when `local_run_dir` is the storage folder itself. Returns the uploaded files."""
        local = Path(local_run_dir)
        if self._same_folder(rel, local):
            return []
        files = local_files(local)
        if final and METRICS_FILE not in files:
            raise ValueError(f"{local} has no {METRICS_FILE}: an unfinished run is persisted with final=False")
        if token is not None:
            self.check_attempt(rel, token)
        if not final and self._path(rel) not in self._cleared:
            # a local run in progress: a finished marker already on storage belongs to an older run of the folder
            self.delete(_join(rel, METRICS_FILE))
            self._cleared.add(self._path(rel))
        sent = self.upload_dir(local, rel, skip=lambda f: f == METRICS_FILE, changed_only=True, progress=progress)
        if final:
            if token is not None:
                self.check_attempt(rel, token)
            if progress:
                progress(METRICS_FILE)
            self.upload_file(local / METRICS_FILE, _join(rel, METRICS_FILE))
            sent.append(METRICS_FILE)
            for stale in sorted(set(filter(_travels, self.list(rel))) - set(files)):
                self.delete(_join(rel, stale))
        return sent

    def fetch_run(self, rel: str, local_run_dir, files: Optional[Iterable[str]] = None) -> list[str]:
        """Copy the run folder `rel` to the local folder (a resume on another node), or only `files`
        (e.g. ["backbone.pt"] for a stage-2 trial; a missing one is FileNotFoundError). A no-op when the
        local folder is the storage folder itself. Returns the downloaded files."""
        if self._same_folder(rel, local_run_dir):
            return []
        if files is None:
            return self.download_dir(rel, local_run_dir)
        got = []
        for f in files:
            self.download_file(_join(rel, f), Path(local_run_dir) / f)
            got.append(_clean_rel(f))
        return got

    def read_metrics(self, rel: str = "") -> Optional[dict]:
        """`core.io.read_metrics` on storage: the run's metrics.json as a mapping, or None when it is absent,
        unreadable JSON or not a mapping. A store that cannot be read raises StorageError."""
        try:
            m = self.read_json(_join(rel, METRICS_FILE))
        except (FileNotFoundError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    # ----- one writer per folder
    def claim(self, rel: str = "", owner: str = "trial") -> str:
        """Make this process the writer of the folder `rel`: PUT `<rel>/.attempt`; returns its token."""
        token = uuid.uuid4().hex
        self.write_json(_join(rel, ATTEMPT_FILE), {
            "token": token, "owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return token

    def claimant(self, rel: str = "") -> Optional[dict]:
        """The current claim of the folder `rel` ({token, owner, host, pid, started}), or None."""
        try:
            c = self.read_json(_join(rel, ATTEMPT_FILE))
        except (FileNotFoundError, ValueError):
            return None
        return c if isinstance(c, dict) else None

    def check_attempt(self, rel: str, token: str) -> None:
        """StorageError unless `token` is the folder's current claim."""
        c = self.claimant(rel)
        if c is None or c.get("token") != token:
            by = (f"another {c.get('owner', 'attempt')} (host {c.get('host')}, pid {c.get('pid')}, started "
                  f"{c.get('started')})" if c else "nobody (its claim was removed: the folder was cleared)")
            raise StorageError(f"{self.join(rel)} is now claimed by {by}; this attempt stops writing there "
                               "(the current claimant's result is the one kept)")

    # ----- before anything runs
    def check(self) -> None:
        """Check that the storage exists and takes a write, in a few seconds: one StorageError line naming
        the problem (missing credentials, unreachable endpoint, missing bucket, bad key or secret, no
        write permission, a file in the way) and its fix."""
        probe = f".storage-check-{uuid.uuid4().hex}"
        if self.is_local:
            root = Path(self.root)
            if root.exists() and not root.is_dir():
                raise StorageError(f"storage {root} is a file, not a folder; pass a folder path")
            try:
                root.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(root / probe, b"ok")
                (root / probe).unlink()
            except OSError as e:
                raise StorageError(f"storage {root} is not writable ({e.strerror or e}); choose a writable folder "
                                   "or fix its permissions") from None
            return
        saved, self._fs = self._fs, self._make_fs(probe=True)
        try:
            from pyarrow import fs as pafs

            self.list("", recursive=False)  # a signed GET: network, key and secret errors have their codes here
            if self._call("look up", "", self.fs.get_file_info, self.bucket).type == pafs.FileType.NotFound:
                raise self._explain(OSError("NO_SUCH_BUCKET"), "look up", "")
            try:
                self.write_bytes(probe, b"ok")
            except StorageError as e:
                if "access denied" in str(e):
                    raise StorageError(f"the credentials (access key '{self._env.get('AWS_ACCESS_KEY_ID', '')}') "
                                       f"may read but not write {self.join()} (access denied); grant them write "
                                       "and delete permission on the bucket or use other credentials") from None
                raise
            if self.read_bytes(probe) != b"ok":
                raise StorageError(f"{self.join(probe)} read back differs from what was written; check the "
                                   "object store's consistency settings")
            self._call("delete", probe, self.fs.delete_file, self._path(probe))
        finally:
            self._fs = saved


class RunPersister:
    """Persists a run folder from node-local scratch while the run goes on, off the training loop:
    `save()` (at each checkpoint save) returns at once, the upload runs in one background thread, and
    saves that arrive during it are folded into one more pass; `finish()` waits for it, then persists
    with `final=True` (metrics.json last). A failure in the background (e.g. the attempt was superseded,
    the store went away) is raised by the next `save()` / `wait()` / `finish()`."""

    def __init__(self, storage: Storage, local_run_dir, rel: str = "", token: Optional[str] = None):
        import threading

        self.storage, self.local, self.rel, self.token = storage, Path(local_run_dir), rel, token
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._again = False
        self._error: Optional[BaseException] = None

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def save(self) -> None:
        import threading

        with self._lock:
            self._raise()
            if not self._done.is_set():
                self._again = True
                return
            self._done.clear()
        threading.Thread(target=self._run, name="persist-run", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                self.storage.persist_run(self.local, self.rel, token=self.token)
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            with self._lock:
                if not self._again or self._error is not None:
                    self._done.set()
                    return
                self._again = False

    def wait(self) -> None:
        self._done.wait()
        self._raise()

    def finish(self) -> list[str]:
        self.wait()
        return self.storage.persist_run(self.local, self.rel, final=True, token=self.token)


# ----- whole results folders
LOCAL_ONLY_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
"""Files a local copy for reading results leaves on storage (weights and training state)."""


def build_on_storage(storage: Storage, build: Callable[[Path], object]) -> str:
    """Run `build(folder)` (e.g. `analysis.report.build_report`) on the results folder `storage`: on a
    folder storage in place; on an object store in a temporary local copy (weights and checkpoints left
    out), whose new or changed files are then uploaded. Returns where report.md is (a path or URI)."""
    import tempfile

    if storage.is_local:
        return str(build(Path(storage.root)))
    with tempfile.TemporaryDirectory(prefix="twinseg-results-") as tmp:
        local = Path(tmp) / (storage.root.rsplit("/", 1)[-1] or "results")
        got = storage.download_dir("", local, skip=lambda f: f.endswith(LOCAL_ONLY_SUFFIXES) or f.startswith("ray/"))
        if not got:
            raise StorageError(f"{storage.join()} holds no files; pass a grid results folder")

        def stamp(f: str) -> tuple[int, int]:
            st = (local / f).stat()
            return st.st_size, st.st_mtime_ns

        before = {f: stamp(f) for f in local_files(local)}
        out = build(local)
        for f in local_files(local):
            if before.get(f) != stamp(f):
                storage.upload_file(local / f, f)
        rel = Path(out).relative_to(local).as_posix() if out is not None and Path(out).is_relative_to(local) else ""
        return storage.join(rel if rel and rel != "." else "report.md")


# ----- measurement
def bench(storage: Storage, size_mb: int = 50, run_dir=None, repeats: int = 3) -> dict:
    """Upload / download rate of one `size_mb` MB file to `storage` (best of `repeats`), and, with
    `run_dir`, what persisting that run folder costs (a checkpoint-time persist of everything but
    metrics.json, the final persist, a fetch for resume). Everything written is deleted afterwards."""
    import tempfile

    out: dict = {"storage": storage.join(), "size_mb": size_mb}
    area = storage.child(f".bench-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "blob.bin"
        big.write_bytes(os.urandom(size_mb * 2**20))
        up, down = [], []
        try:
            for _ in range(repeats):
                t = time.perf_counter()
                area.upload_file(big, "blob.bin")
                up.append(time.perf_counter() - t)
                t = time.perf_counter()
                area.download_file("blob.bin", Path(tmp) / "back.bin")
                down.append(time.perf_counter() - t)
            if (Path(tmp) / "back.bin").read_bytes() != big.read_bytes():
                raise StorageError(f"{area.join('blob.bin')} came back different from what was uploaded")
            out.update(upload_mb_s=round(size_mb / min(up), 1), download_mb_s=round(size_mb / min(down), 1))
            if run_dir is not None:
                files = local_files(Path(run_dir))
                out["run_files"] = len(files)
                out["run_mb"] = round(sum((Path(run_dir) / f).stat().st_size for f in files) / 2**20, 2)
                run = area.child("run")
                t = time.perf_counter()
                run.persist_run(run_dir)
                out["persist_checkpoint_s"] = round(time.perf_counter() - t, 3)
                run._sent.clear()
                persister = RunPersister(run, run_dir)
                t = time.perf_counter()
                persister.save()
                out["persist_checkpoint_blocking_s"] = round(time.perf_counter() - t, 4)  # the training loop's share
                persister.wait()
                if METRICS_FILE in files:
                    run._sent.clear()  # the final persist of a fresh process: everything goes again
                    t = time.perf_counter()
                    run.persist_run(run_dir, final=True)
                    out["persist_final_s"] = round(time.perf_counter() - t, 3)
                t = time.perf_counter()
                run.fetch_run("", Path(tmp) / "fetched")
                out["fetch_s"] = round(time.perf_counter() - t, 3)
        finally:
            area.delete()
    return out


def main(argv=None) -> None:
    """python -m core.storage check URI | bench URI [--size-mb N] [--run-dir DIR]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m core.storage", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="check that URI is reachable and writable").add_argument("uri")
    b = sub.add_parser("bench", help="upload / download rate and the cost of persisting a run folder")
    b.add_argument("uri")
    b.add_argument("--size-mb", type=int, default=50)
    b.add_argument("--run-dir", default=None, help="a run folder to persist and fetch back")
    args = parser.parse_args(argv)
    storage = Storage(args.uri)
    storage.check()
    if args.cmd == "check":
        print(f"{storage.join()}: reachable and writable")
    else:
        print(json.dumps(bench(storage, args.size_mb, args.run_dir), indent=2))


if __name__ == "__main__":
    from core.cli import guard

    guard(main)(sys.argv[1:])
