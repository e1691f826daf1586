"""The ``result.json`` record of one run (schema ``mtbench.result/1``) and atomic file writing.

A result holds everything the leaderboard needs without MLflow: the resolved config, task and metric versions,
metric values with their directions, parameter counts, throughput, memory, status and provenance.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import MtbenchError


SCHEMA = "mtbench.result/1"
REQUIRED = {
    "schema": str,
    "run_id": str,
    "status": str,
    "method": str,
    "task": str,
    "task_version": str,
    "profile": str,
    "seed": int,
    "method_config_id": str,
    "config": dict,
    "metrics": dict,
    "metric_specs": dict,
    "params": dict,
    "perf": dict,
    "provenance": dict,
}
STATUSES = ("FINISHED", "FAILED", "KILLED")


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path`` (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Validate and atomically write a result record."""
    validate(result, str(path))
    atomic_write(path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")


def validate(result: Any, name: str = "result") -> dict[str, Any]:
    """Check a result record against the schema; raise :class:`MtbenchError` naming the first problem."""
    if not isinstance(result, dict):
        raise MtbenchError(f"{name}: not a JSON object")
    if result.get("schema") != SCHEMA:
        raise MtbenchError(f"{name}: schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in REQUIRED.items():
        if not isinstance(result.get(key), kind) or isinstance(result.get(key), bool) and kind is int:
            raise MtbenchError(f"{name}: field '{key}' missing or not of type {kind.__name__}")
    if result["status"] not in STATUSES:
        raise MtbenchError(f"{name}: status {result['status']!r} is not one of {', '.join(STATUSES)}")
    for key, value in result["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MtbenchError(f"{name}: metric '{key}' is not a number")
        if key not in result["metric_specs"]:
            raise MtbenchError(f"{name}: metric '{key}' has no spec (direction and version)")
    return result


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``result.json``; a truncated or tampered file raises naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MtbenchError(f"{path}: unreadable result file ({exc.__class__.__name__})") from exc
    return validate(data, str(path))
