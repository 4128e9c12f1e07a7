"""Atomic file writes, and what makes a run folder finished (no heavy imports: the report CLI and the
grid driver use this before loading pandas or torch).

THE writer of every file that could pass for a result (metrics.json, config.json, checkpoints, exported
weights, summaries, tables, figures, accounting.json): `atomic_write` creates a temporary file in the
target's own folder, lets the caller fill it, fsyncs it, `os.replace`s it into place and fsyncs the folder
(where the platform allows opening a folder), so a run, grid or report killed half-way never leaves a
truncated file behind, only the old one or the new one, and the rename itself survives a power loss.
A full disk (ENOSPC / EDQUOT) leaves the old file and raises `DiskFullError`, a `StorageError` (one line
naming the folder, the space needed when known, and how to resume) that is also an `OSError`.
Helpers: `atomic_write_bytes`, `atomic_write_text`, `atomic_write_json`, `atomic_save_figure`,
`atomic_torch_save` (weights, checkpoints: serialised in memory first, so a full disk is that one line and not
torch's `inline_container.cc` RuntimeError). tests/test_io.py checks that no other module renames a temp
file into place itself.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import StorageError

METRICS_FILE = "metrics.json"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def read_metrics(out_dir) -> Optional[dict]:
    """The result of a finished run folder (its metrics.json as a mapping), or None when the run is not
    finished (absent, unreadable or not a mapping). The ONE definition of "finished": metrics.json is
    written last and atomically, so a readable one is a complete result."""
    try:
        with open(Path(out_dir) / METRICS_FILE, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


class DiskFullError(StorageError, OSError):
    """A write that ran out of space: the one-line `StorageError` of the CLIs, and still the `OSError` (errno,
    strerror, filename) that callers catching OSError (the grid's summary writer, a trial's error file) expect."""

    def __init__(self, message: str, err: int, filename: str):
        super().__init__(message)
        self.errno, self.strerror, self.filename = err, os.strerror(err), filename

    def __str__(self) -> str:
        return str(self.args[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_all(fd: int, data) -> None:
    """Write `data` (bytes / memoryview) to `fd` completely (a module function so tests can inject ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def disk_full_message(folder: Path, needed: Optional[int], what: str) -> str:
    """The one line of a write that ran out of space in `folder` (`needed` bytes; None: unknown)."""
    import shutil

    try:
        free_s = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free"
    except OSError:
        free_s = "free space unknown"
    need = f" needs {needed / 2**20:.1f} MB" if needed is not None else ""
    return (f"no space left on the device holding {folder}: writing {what}{need} ({free_s}); free some space "
            "and rerun the same command to resume")


def fsync_folder(folder: Path) -> None:
    """fsync `folder` so that a rename into it survives a power loss; a no-op where a folder cannot be
    opened (Windows) or synced (some network filesystems)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fill(path: Path, fill: Callable[[int, str], None], suffix: str, what: Optional[str],
          size: Optional[int]) -> Path:
    """The one implementation: temp file next to `path`, `fill(fd, tmp_path)`, fsync, chmod, replace,
    fsync of the folder; the temp file is removed on any failure, ENOSPC becomes StorageError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=str(path.parent))
    try:
        try:
            fill(fd, tmp)
        finally:
            os.close(fd)
        sync = os.open(tmp, os.O_RDONLY)  # by name: a writer may have replaced the temp file (a download's move)
        try:
            os.fsync(sync)
        finally:
            os.close(sync)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for everyone to read
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL and not isinstance(e, DiskFullError):
            raise DiskFullError(disk_full_message(path.parent, size, what or path.name), e.errno, str(path)) from None
        raise
    fsync_folder(path.parent)
    return path


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = "", *, what: Optional[str] = None) -> Path:
    """Create `path` atomically with `write(tmp_path)` (a library's own save: torch.save, savefig, a
    download); the temp name keeps `suffix` (e.g. '.png', '.safetensors') for writers that read it.
    `what` names the file in the disk-full message (default: its name)."""
    return _fill(path, lambda fd, tmp: write(tmp), suffix, what, None)


def atomic_write_bytes(path: Path, data, *, what: Optional[str] = None) -> Path:
    """Create `path` atomically holding `data` (bytes / bytearray / memoryview)."""
    return _fill(path, lambda fd, tmp: _write_all(fd, data), "", what, memoryview(data).nbytes)


def atomic_write_text(path: Path, text: str, *, what: Optional[str] = None) -> Path:
    """Create `path` atomically holding `text` (utf-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"), what=what)


def atomic_write_json(path: Path, obj: Any, *, default: Optional[Callable[[Any], Any]] = None,
                      what: Optional[str] = None) -> Path:
    """Create `path` atomically holding `obj` as indented JSON plus a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=default) + "\n", what=what)


def atomic_torch_save(obj: Any, path: Path, *, what: Optional[str] = None) -> Path:
    """`torch.save(obj)` to `path` atomically. The object is serialised into memory first (one extra copy of
    its tensors' bytes: a few hundred MB for the largest backbone), then written with `atomic_write_bytes`:
    torch's own file writer turns ENOSPC into a `RuntimeError: [enforce fail at inline_container.cc]` that
    no longer says the disk is full, and its size is unknown until the end."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer(), what=what)


def atomic_save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, PNG when none; tight bounding box)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt),
                        path.suffix or ".png")
