"""The errors a user can cause. `cli.main` prints any `UserError` as one `error:` line and exits with status 2.

The ValueError bases are kept so callers that caught the old standalone classes still catch them.
"""

import errno


class UserError(Exception):
    """Caused by the user's input; the message is one line naming the key, file or line."""


class ConfigError(UserError, ValueError):
    """A value in the composed config; the message names the key."""


class FactorError(UserError, ValueError):
    """An expansion factor or derived size that cannot build a network."""


class DataError(UserError):
    """A data problem: the message names the file and line, the path or the config key."""


class WeightsError(UserError, ValueError):
    """A checkpoint that cannot be converted or loaded; the message names the key."""


class CheckpointError(UserError, ValueError):
    """The file is not a PyTorch checkpoint this reader understands."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the allow-list (it may try to run code)."""


class LaunchError(UserError):
    """The distributed run failed or timed out; the message names the failing rank's log."""


# The errnos of a full disk (or a full quota): what NoSpace stands for.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class NoSpace(UserError):
    """The disk of the run dir is full: a checkpoint or the trained model could not be written. `run_dir` is where
    the complete checkpoints written before are, for the resume command the CLI prints."""

    def __init__(self, message: str, run_dir=None):
        super().__init__(message)
        self.run_dir = run_dir


class Interrupted(BaseException):
    """The job was stopped by a signal (SIGINT, SIGTERM, SIGUSR1) at a step boundary, after saving its state."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
