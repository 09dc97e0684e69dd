"""The mistakes a user can make in a run's request, as exceptions the command line reports in
one line (``user_mistake``) instead of a traceback."""

from __future__ import annotations

__all__ = ["ConfigError", "RunDirError", "Diverged"]


class ConfigError(ValueError):
    """A TrainConfig field, flag or config file with a wrong type or value (a user mistake:
    the command line prints the message alone and exits with status 2)."""

    user_mistake = True


class RunDirError(RuntimeError):
    """A run folder that cannot be used as asked: it holds another run, another process is
    writing to it, ``--resume`` finds nothing to resume or different settings (a user
    mistake)."""

    user_mistake = True


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the run stopped, its last checkpoint is the
    last good one. (Not a traceback on the command line, but exit status 1.)"""

    user_mistake = True
    exit_status = 1
