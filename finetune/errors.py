"""Errors meant for people.

Every expected mistake (bad config, bad data, missing model) raises a subclass of
`FinetuneError`. The CLI prints `str(err)` on one line and exits non-zero; the app shows
it inline. Anything else is a bug and keeps its traceback.
"""


class FinetuneError(Exception):
    """Base class for errors a user can fix. The message says what is wrong and how to fix it."""


class ConfigError(FinetuneError):
    """A config field has a bad value. The message names the field in backticks."""


class DataError(FinetuneError):
    """A dataset file, row or field is unusable. The message names file, row, field and fix."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.source, self.row, self.field = source, row, field


class ModelError(FinetuneError):
    """A base model or adapter can't be found or loaded."""


class HubError(FinetuneError):
    """The Hub refused or couldn't be reached. Never carries a token."""


class OutOfMemory(FinetuneError):
    """Training ran out of GPU or CPU memory. The message lists settings that need less."""


class DiskFull(FinetuneError):
    """A write failed because the disk (or a size quota) is full. The message names the folder."""
