"""Atomic file writes: write a temporary file in the same folder, then `os.replace` it into place.

A report killed half-way therefore never leaves a truncated `report.md`, table or figure behind:
either the previous file or the complete new one is there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _atomic(path: Path, write: Callable[[str], None], suffix: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, _w, "")


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (the temporary name keeps the .png suffix)."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"), ".png")


def write_file(path: Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Atomically create `path` with `write(tmp_path)` (e.g. an image library's save)."""
    return _atomic(path, write, suffix)
