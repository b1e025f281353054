"""SIGINT and SIGTERM: a request to stop after the current step, or a stop at once.

Importable without torch: the command line installs :func:`interrupt_on_signals` before it
loads anything.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM that stopped the process at once, wherever it was.

    A KeyboardInterrupt, so that no ``except Exception`` in a plugin swallows it. ``second``:
    it came while the run was already stopping for an earlier signal; otherwise it came
    outside training (before it started, or between the runs of an ablation).
    """

    def __init__(self, signal_number: int, *, second: bool) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number
        self.second = second

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name


@contextlib.contextmanager
def _handling(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM inside the block, the previous handlers after it.

    Signal handlers can only be set from the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block.

    Without it, Ctrl-C raises a bare KeyboardInterrupt that says nothing of its signal and
    SIGTERM kills the process without a word.
    """

    def handle(number: int, frame: FrameType | None) -> None:
        raise Interrupted(number, second=False)

    with _handling(handle):
        yield


class StopRequest:
    """The first SIGINT or SIGTERM received while training, if any."""

    signal_number: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn Ctrl-C and SIGTERM into a request the loop honours after the current step.

    A second signal raises :class:`Interrupted` at once, even inside a checkpoint write:
    writes are atomic, so the files already saved stay intact.
    """
    request = StopRequest()

    def handle(number: int, frame: FrameType | None) -> None:
        if request.signal_number is not None:
            raise Interrupted(number, second=True)
        request.signal_number = number

    with _handling(handle):
        yield request
