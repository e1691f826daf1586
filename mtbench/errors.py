"""User-facing errors: the CLI prints their message on one line and exits with status 2 (tracebacks with --debug)."""

from __future__ import annotations


class MtbenchError(Exception):
    """Base of every error caused by the user's input (names, options, data, plugins, environment)."""


class ConfigError(MtbenchError, ValueError):
    """A bad configuration key or value; the message names the key and what is allowed."""


class DataError(MtbenchError):
    """Missing or malformed data; the message names the file and what was expected there."""
