"""SIGTERM (docker stop, a scheduler's time limit) ends a run between writes, never inside one.

While `uninterrupted()` is active (an atomic write, the final reports) the signal is held back and raised as
`Terminated` when the block ends; elsewhere it is raised at once, so a case in the middle of inference stops within
seconds and the runner records what was done.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(BaseException):
    """The process was asked to stop. A BaseException, as KeyboardInterrupt is: the `except Exception` of a library
    (logging's emit, an import's fallback) must not swallow a stop that arrives while it runs."""


_state = {"depth": 0, "pending": None}


@contextlib.contextmanager
def uninterrupted():
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            raise Terminated(signal.Signals(signum).name)


def _handler(signum, _frame):
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into `Terminated` while the block runs (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _TerminatedInThread(Terminated):
    """`Terminated` raised inside another thread (an invoke-mode invocation); Python instantiates it bare."""

    def __init__(self, *args):
        super().__init__(*(args or ("SIGTERM",)))


def interrupt_thread(thread_id: int) -> None:
    """Raise `Terminated` ("SIGTERM") in the thread `thread_id` (an invocation running in a server's worker thread,
    where no signal handler can reach): at once between Python statements, or when its `uninterrupted()` write
    ends."""
    import ctypes

    if _state["depth"]:
        _state["pending"] = signal.SIGTERM
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_TerminatedInThread))
