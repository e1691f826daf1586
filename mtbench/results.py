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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path`` (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the mode an ordinary write would (published files must be readable).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
    if not result["run_id"]:
        raise MtbenchError(f"{name}: field 'run_id' is empty")
    _validate_values(result, name)
    return result


def _validate_values(result: dict[str, Any], name: str) -> None:
    for key, value in result["metrics"].items():
        if not _is_number(value):
            raise MtbenchError(f"{name}: metric '{key}' is not a number")
        if key not in result["metric_specs"]:
            raise MtbenchError(f"{name}: metric '{key}' has no spec (direction and version)")
    for key, spec in result["metric_specs"].items():
        if not (isinstance(spec, dict) and isinstance(spec.get("higher_is_better"), bool)
                and isinstance(spec.get("version"), (str, int)) and not isinstance(spec.get("version"), bool)):
            raise MtbenchError(f"{name}: metric spec '{key}' needs a boolean 'higher_is_better' and a 'version'")
    for key, value in result["params"].items():
        if not _is_number(value):
            raise MtbenchError(f"{name}: parameter count '{key}' is not a number")
    provenance = result["provenance"]
    if not isinstance(provenance.get("device", ""), str) or not isinstance(provenance.get("versions", {}), dict):
        raise MtbenchError(f"{name}: provenance 'device' must be a string and 'versions' a mapping")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``result.json``; a truncated or tampered file raises naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MtbenchError(f"{path}: unreadable result file ({exc.__class__.__name__})") from exc
    return validate(data, str(path))
