"""Errors a user can cause.

Anything raised as a ``UserError`` is the user's to fix (a bad path, a config typo, a corrupt
checkpoint): the CLI prints its message on one line and exits with code 2, no traceback.
"""


class UserError(ValueError):
    """Bad input from the user; the message names what is wrong."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(UserError):
    """A corpus is unknown, missing, empty, too short or not valid UTF-8."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupt or of another architecture."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""
