"""User-facing errors.

Every error a user can cause (bad path, bad layout, bad config value, missing weights...) is raised
as a `TwinsegError` subclass whose message is ONE line saying what is wrong, where, and how to fix
it. Entry points wrap `main` in `core.cli.guard`, which prints that line and exits non-zero without
a traceback.
"""


class TwinsegError(Exception):
    """A one-line, user-fixable error (what, where, how to fix)."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


class ConfigError(TwinsegError):
    """A configuration value (CLI flag, grid file, dataclass field) is invalid."""


class DataError(TwinsegError):
    """A dataset is missing, has the wrong layout, or holds a corrupt/out-of-range file."""


class WeightsError(TwinsegError):
    """Pretrained weights are missing, unsafe, or do not match the architecture."""


class FolderBusyError(TwinsegError):
    """A run or results folder is held (core.folder_lock) by another live process."""


class NonFiniteError(TwinsegError):
    """Training diverged: a loss, weight or evaluation metric is NaN / inf. Rerunning the same config
    repeats it (the grid marks such a trial failed without retrying it)."""


class StorageError(TwinsegError):
    """The output folder cannot be written: read-only, a file, or the disk is full; or the results
    storage (core/storage.py: a shared path or an object store) is unreachable, lacks credentials or its
    bucket, refuses the key, or was claimed by another attempt."""


class InterruptedRun(TwinsegError):
    """SIGTERM / SIGINT ended a run; rerunning the same command resumes from its last checkpoint.
    Exit status 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports it."""

    exit_code = 143

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
