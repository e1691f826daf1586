"""User-facing errors: the CLI prints their message on one line and exits with status 2 (tracebacks with --debug)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MtbenchError(Exception):
    """Base of every error caused by the user's input (names, options, data, plugins, environment)."""


class ConfigError(MtbenchError, ValueError):
    """A bad configuration key or value; the message names the key and what is allowed."""


class DataError(MtbenchError):
    """Missing or malformed data; the message names the file and what was expected there."""


def did_you_mean(name: str, choices: Iterable[str], kind: str) -> str:
    """Return ``unknown <kind> 'x'; did you mean 'y'? available: a, b`` for an unknown name."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'{hint} available: {', '.join(choices) or '(none)'}"
