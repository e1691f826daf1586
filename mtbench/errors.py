"""User-facing errors: the CLI prints their message on one line and exits with status 2 (tracebacks with --debug);
and SIGTERM turned into the KeyboardInterrupt the CLI reports as an interruption (exit 130)."""

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
    """The choice closest to a mistyped ``name``, or ``None`` where none is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
    return close[0] if close else None


def did_you_mean(name: str, choices: Iterable[str], kind: str) -> str:
    """Return ``unknown <kind> 'x'; did you mean 'y'? available: a, b`` for an unknown name."""
    choices = sorted(choices)
    close = nearest(name, choices)
    hint = f"; did you mean '{close}'?" if close else ""
    return f"unknown {kind} '{name}'{hint} available: {', '.join(choices) or '(none)'}"


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so a terminated command or run stops the
    way an interrupted one does (a run in training records itself KILLED; before that, one line and exit 130).
    The previous handler comes back on exit. Off the main thread, where handlers cannot be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
