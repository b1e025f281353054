"""The one exception type that reaches a user as a sentence instead of a traceback."""


class HooktrainError(Exception):
    """Something the user can fix: the message says what went wrong and what to do.

    The command line prints the message alone and exits with code 2.
    """
