"""The exceptions that reach a user as a sentence instead of a traceback, and how text the
user gave (paths, keys, other errors' messages) goes inside such a sentence."""

from __future__ import annotations

from pathlib import Path


class HooktrainError(Exception):
    """Something the user can fix: the message says what went wrong and what to do.

    The command line prints the message alone and exits with ``exit_code``.
    """

    exit_code = 2


class TrainingDiverged(HooktrainError):
    """The loss or the gradients stopped being finite numbers; the run was stopped."""

    exit_code = 3


class TrainingStopped(HooktrainError):
    """A signal (Ctrl-C, SIGTERM) stopped the run after its state was handed to fit_stop.

    The exit code is the shell's for that signal: 128 + its number (130, 143).
    """

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


def shown(text: Path | str | object) -> str:
    """User text printable on one line: as typed, or quoted and escaped when it holds a line
    break or a name that is not UTF-8 (its bytes decode to lone surrogates, which no terminal
    can print)."""
    text = str(text)
    return text if text.isprintable() else repr(text)


def short_reason(error: BaseException) -> str:
    """An exception's message on one line of at most 160 characters, for inside a sentence."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
