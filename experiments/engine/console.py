"""The grid driver's console: one time-stamped line per event (rich when available, plain text
otherwise), and how its lines format a value."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import Any, Optional


class Console:
    """One line per event, with a time stamp (rich when available, plain text otherwise)."""

    def __init__(self) -> None:
        try:
            from rich.console import Console as RichConsole

            self._rich = RichConsole(highlight=False, soft_wrap=True)
        except ImportError:  # pragma: no cover
            self._rich = None

    def __getstate__(self) -> dict:  # Tune pickles its searcher/callbacks (which hold the console)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def line(self, msg: str, style: Optional[str] = None) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self._rich is not None:
            from rich.markup import escape

            text = f"[dim]{stamp}[/dim] " + (f"[{style}]{escape(msg)}[/{style}]" if style else escape(msg))
            self._rich.print(text)
        else:
            print(f"{stamp} {msg}", flush=True)
        sys.stdout.flush()


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
