"""The exceptions that reach a user as a sentence instead of a traceback."""


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
