"""One error type the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations


class EarlyfwError(Exception):
    """A failure the user can act on; `hint` says how."""

    exit_status = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(EarlyfwError):
    """A bad value from the user: exit status 2, nothing written."""

    exit_status = 2


class CommandError(EarlyfwError):
    """An external command failed; its stderr is part of the message."""
