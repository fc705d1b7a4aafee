"""Ctrl-C and SIGTERM, made safe for the tracking store.

A KeyboardInterrupt raised in the middle of a store call cuts a sqlite transaction in half (the database stays
locked for every later call: "database is locked") or leaves an HTTP request half sent. So while a store call is
in flight (`shielded()`), SIGINT and SIGTERM are only recorded, and raised the moment the call returns.

SIGTERM (kill, job schedulers, Ray) ends a command exactly like Ctrl-C: it raises `Terminated`, a
KeyboardInterrupt, so every `except KeyboardInterrupt` path (runs ended KILLED, finished ones kept) handles both.

Once the science is done and logging has begun (`logging_phase()`), the first Ctrl-C only says that logging is in
progress and lets it go on (the results are on disk, nothing is gained by stopping); a second one stops.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C, but the command exits 143 instead of 130."""


_depth = 0  # nesting of shielded() blocks in the main thread
_pending: int | None = None  # a signal that arrived while shielded, raised when the shield drops
_on_first_interrupt: Callable[[], str] | None = None  # logging phase, until its first Ctrl-C: what that prints
_ignoring = False  # while open runs are being ended after an interrupt: more signals cannot make it better
_raised: int | None = None  # the signal last raised as an exception


def _raise_for(signum: int):
    global _raised
    _raised = signum
    raise Terminated("terminated (SIGTERM)") if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    global _pending, _on_first_interrupt
    if _ignoring:
        return
    if signum == signal.SIGINT and _on_first_interrupt is not None:
        progress, _on_first_interrupt = _on_first_interrupt, None  # the second Ctrl-C stops
        try:
            text = progress()
        except Exception:  # noqa: BLE001 - a message must never turn a Ctrl-C into a crash
            text = "logging is in progress; press Ctrl-C again to stop it."
        os.write(2, f"\n{text}\n".encode(errors="replace"))
        return
    if _depth > 0:
        if _pending is None or signum == signal.SIGTERM:  # SIGTERM wins: it decides the exit code
            _pending = signum
        return
    _raise_for(signum)


def install() -> None:
    """Route SIGINT and SIGTERM through this module (main thread only; elsewhere Python's defaults stay)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _handler)


def words(interrupt: BaseException) -> str:
    """What stopped a command, as the error tag of the runs it ends."""
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted (Ctrl-C)"


def as_raised(interrupt: KeyboardInterrupt) -> KeyboardInterrupt:
    """The exception the last signal raised: Ray turns any exception of a handler run inside ray.wait/get
    into a plain KeyboardInterrupt, which would make a SIGTERM exit 130."""
    if _raised == signal.SIGTERM and not isinstance(interrupt, Terminated):
        return Terminated("terminated (SIGTERM)")
    return interrupt


@contextmanager
def shielded():
    """No KeyboardInterrupt inside: a signal that arrives here is raised when the block ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)


@contextmanager
def logging_phase(progress: Callable[[], str]):
    """The first Ctrl-C prints progress() and is otherwise ignored; the second stops as usual."""
    global _on_first_interrupt
    _on_first_interrupt = progress
    try:
        yield
    finally:
        _on_first_interrupt = None


@contextmanager
def ignored():
    """While ending runs on the way out of an error or interrupt: further signals are dropped, so the runs
    are ended (each store call is bounded) instead of being left RUNNING by an impatient second Ctrl-C."""
    global _ignoring, _pending
    saved, _ignoring = _ignoring, True
    try:
        yield
    finally:
        _ignoring = saved
        if not saved:
            _pending = None
