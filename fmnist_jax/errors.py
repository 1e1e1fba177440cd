"""Errors a user can fix: each message is one line naming the problem and the fix."""


class UserError(Exception):
    """A problem with the input, the data or the checkpoints, reported without a traceback."""


class ConfigError(UserError):
    """An invalid setting, or one a resume cannot change."""


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be used as asked."""


class UnrestorableCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or garbled."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss, so it stopped before saving."""
