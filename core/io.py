"""Atomic file writes, and what makes a run folder finished (no heavy imports: the report CLI and the
grid driver use this before loading pandas or torch).

Write a temporary file in the same folder, fsync, then `os.replace` it into place: a run, grid or
report killed half-way never leaves a truncated file behind, only the old one or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

METRICS_FILE = "metrics.json"


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Create `path` atomically with `write(tmp_path)` (the temp name keeps `suffix`, e.g. '.png')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _w)
