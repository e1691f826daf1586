"""User-facing errors: the CLI prints their message on one line and exits with status 2 (tracebacks with --debug);
and Ctrl-C and SIGTERM turned into the KeyboardInterrupt the CLI reports as an interruption (exit 130)."""

from __future__ import annotations

import difflib
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class MtbenchError(Exception):
    """Base of every error caused by the user's input (names, options, data, plugins, environment)."""


class ConfigError(MtbenchError, ValueError):
    """A bad configuration key or value; the message names the key and what is allowed."""


class DataError(MtbenchError):
    """Missing or malformed data; the message names the file and what was expected there."""


def nearest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a mistyped ``name`` (letter case aside: ``MoSLD`` finds ``mosld``), or ``None`` where
    none is close."""
    by_folded = {c.casefold(): c for c in sorted(choices)}
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1, cutoff=0.5)
    return by_folded[close[0]] if close else None


def did_you_mean(name: str, choices: Iterable[str], kind: str) -> str:
    """Return ``unknown <kind> 'x'; did you mean 'y'? available: a, b`` (``unknown <kind> 'x'; available: a, b``
    where nothing is close) for an unknown name."""
    choices = sorted(choices)
    close = nearest(name, choices)
    hint = f"; did you mean '{close}'?" if close else ";"
    return f"unknown {kind} '{name}'{hint} available: {', '.join(choices) or '(none)'}"


_pending: list[int] = []
"""Stop signals the handler of :func:`signals_as_interrupt` received and nothing has yet taken
(:func:`take_pending_signal`)."""


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM raise KeyboardInterrupt, so a terminated command or run stops the way an
    interrupted one does (a run in training records itself KILLED; before that, one line and exit 130).

    The handler also notes the signal (:func:`take_pending_signal`): a KeyboardInterrupt raised while a finaliser or
    a garbage-collection callback runs (SQLAlchemy registers one, and MLflow's store sets it up) is printed as
    "Exception ignored" and lost, and the note is what lets the run stop anyway (``GracefulStop``). The previous
    handlers come back on exit. Off the main thread, where handlers cannot be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        _pending.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def take_pending_signal() -> int | None:
    """The first stop signal noted since the last call (and forget them all), or ``None``."""
    first = _pending[0] if _pending else None
    _pending.clear()
    return first
