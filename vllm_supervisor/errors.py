"""Errors that reach the user as one line: a message and a hint, never a traceback."""

from __future__ import annotations

import enum


class SupervisorError(Exception):
    """An error the CLI reports as `error: ...; hint: ...` with a chosen exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        """The message and hint on one line."""
        return f"{self.message}; hint: {self.hint}" if self.hint else self.message


class UsageError(SupervisorError):
    """Bad command-line input."""

    exit_code = 2


class LaunchError(SupervisorError):
    """vLLM could not be started at all (missing or unusable binary)."""


class ExitCode(enum.IntEnum):
    """The supervisor's own exit codes (README: "Exit codes")."""

    OK = 0
    USAGE = 2
    START_FAILED = 3
    ESCALATED = 4
    SURVIVED_SIGKILL = 5
    VRAM_NOT_RELEASED = 6
    ENGINE_DIED = 7
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127
