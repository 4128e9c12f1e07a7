"""Entry-point helpers: one clear line and a non-zero exit for user errors, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

from core.errors import InterruptedRun, TwinsegError

F = TypeVar("F", bound=Callable[..., object])


def fail(message: str, code: int = 2) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
    print(f"twinseg: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def guard(fn: F) -> F:
    """Wrap a CLI `main`: TwinsegError -> one line on stderr + exit 2;
    an interrupted run (`InterruptedRun`, SIGTERM / SIGINT) -> `twinseg: interrupted by SIGTERM; rerun the
    same command to resume from ...` + exit 143 / 130; Ctrl-C elsewhere -> exit 130.

    Set TWINSEG_TRACEBACK=1 to see the full traceback of a TwinsegError while debugging.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InterruptedRun as e:
            print(f"twinseg: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code)
        except TwinsegError as e:
            if os.environ.get("TWINSEG_TRACEBACK"):
                raise
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            print("twinseg: interrupted", file=sys.stderr)
            raise SystemExit(130)

    return wrapper  # type: ignore[return-value]
