"""One writer per folder: an exclusive advisory lock on `<folder>/.lock`.

    with folder_lock(out_dir, "pretrain run"):
        ...  # only this process writes into out_dir

`fcntl.flock` (the Linux/macOS kernel's advisory file lock) is taken on `<path>/.lock` (the folder is
created when missing). The kernel drops the lock when the process dies, however it dies (SIGKILL, OOM),
so a stale `.lock` file never blocks anyone: only a LIVE holder does. The file records the holder's pid,
start time and kind (its `owner`), for the message a second writer gets:

    <path> is in use by another <holder's owner> (pid N, started T); wait for it or use another --output

raised as `core.errors.FolderBusyError` (a TwinsegError: one line, exit 2) at once, never waiting.
Re-entrant within one process: a nested `folder_lock` on a folder this process already holds (e.g. a
grid trial that locks its folder, then calls `run_pretrain`, which locks it again) passes through.

The `.lock` file is the one file here NOT written through `core.io`'s atomic writer, on purpose: the lock
lives on the file's inode, so the holder's line is written in place on the locked descriptor (a rename would
put an unlocked inode under the name); it is never a result, only the text of the busy message.

On a filesystem without flock support (some network mounts) the lock degrades to a no-op with one
warning: the run goes on, unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

from core.errors import ConfigError, FolderBusyError

LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # folders this process holds -> nesting depth
_HELD_LOCK = threading.Lock()


def _holder(lock_path: Path, owner: str) -> str:
    """'<owner> (pid N, started T)' of the live holder, from what it wrote into the lock file."""
    try:
        text = lock_path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    parts = text.split(" ", 2)
    pid = parts[0] if parts and parts[0] else "?"
    started = parts[1] if len(parts) > 1 else "?"
    held_by = parts[2] if len(parts) > 2 and parts[2] else owner
    return f"{held_by} (pid {pid}, started {started})"


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a folder; pass a folder path as --output")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise ConfigError(f"cannot create the folder {path} (permission denied); choose a writable --output") \
            from None
    except OSError as e:
        raise ConfigError(f"cannot create the folder {path} ({e.strerror or e}); choose another --output") from None


@contextlib.contextmanager
def folder_lock(path, owner: str) -> Iterator[Path]:
    """Hold the exclusive lock of folder `path` (created if needed) for the `with` block; `owner`
    names the holder's kind in the message another writer gets (e.g. "pretrain run", "grid driver").
    Raises FolderBusyError (one line) when another live process holds it; ConfigError when `path` is
    a file or cannot be created / written."""
    import fcntl

    path = Path(path)
    _make_folder(path)
    key = str(path.resolve())
    with _HELD_LOCK:
        nested = key in _HELD
        if nested:
            _HELD[key] += 1
    if nested:
        try:
            yield path
        finally:
            with _HELD_LOCK:
                _HELD[key] -= 1
        return
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        raise ConfigError(f"{path} is not writable (permission denied); choose a writable --output") from None
    except OSError as e:
        raise ConfigError(f"cannot write in {path} ({e.strerror or e}); choose another --output") from None
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise FolderBusyError(f"{path} is in use by another {_holder(lock_path, owner)}; "
                                  "wait for it or use another --output") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(f"{path}: the filesystem does not support file locks ({e.strerror}); "
                          "nothing stops a second writer on this folder", RuntimeWarning, stacklevel=3)
        if locked:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {stamp} {' '.join(str(owner).split())}\n".encode(), 0)
        with _HELD_LOCK:
            _HELD[key] = 1
        try:
            yield path
        finally:
            with _HELD_LOCK:
                _HELD.pop(key, None)
    finally:
        if locked:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_locked(path) -> bool:
    """True when another live process holds `path`'s lock (the folder is "in progress"); False for
    a folder this process holds itself."""
    import fcntl

    with _HELD_LOCK:
        if str(Path(path).resolve()) in _HELD:
            return False
    lock_path = Path(path) / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
