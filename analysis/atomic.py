"""Atomic writes for the report (thin wrappers over `core.io`): a killed report never leaves a
truncated `report.md`, table or figure behind."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from core.io import atomic_save_figure, atomic_write, atomic_write_text

write_text = atomic_write_text


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (`core.io.atomic_save_figure`, at the report's 120 dpi)."""
    return atomic_save_figure(fig, path, dpi=dpi)


def write_file(path: Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Atomically create `path` with `write(tmp_path)` (e.g. an image library's save)."""
    return atomic_write(path, write, suffix)
