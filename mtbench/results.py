"""The ``result.json`` record of one run (schema ``mtbench.result/1``) and atomic file writing.

A result holds everything the leaderboard needs without MLflow: the resolved config, task and metric versions,
metric values with their directions, parameter counts, throughput, memory, status and provenance.

Integrity: :func:`write_result` records ``sha256``, the SHA-256 of the record's canonical JSON (every other field,
keys sorted, no whitespace), in the file, and the runner records the same digest in the store as the run's tag
``mtbench.result_sha256``. :func:`read_result` refuses a file whose content no longer matches its digest. The file
is plain JSON: a metric that could not be measured is ``null``; ``NaN`` / ``Infinity`` literals, numbers beyond
:data:`LIMIT` in magnitude (``1e999``, a 400-digit integer), nesting deeper than :data:`MAX_DEPTH` and files over
:data:`MAX_BYTES` are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import math
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
LIMIT = 1e15
"""Largest magnitude of a metric, parameter count or measurement a result may hold (beyond it: absurd)."""
MAX_DEPTH = 32
"""Deepest nesting of objects and arrays a result may have (a config is a few levels deep)."""
MAX_BYTES = 16 * 2**20
"""Largest result file read."""
_MAX_DIGITS = 20


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


def content_digest(result: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON, without its own ``sha256`` field."""
    body = {k: v for k, v in result.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_result(path: str | Path, result: dict[str, Any]) -> str:
    """Validate and atomically write a result record with its ``sha256``; returns the digest.

    Non-finite floats (a metric that diverged or was not measured) are written as ``null``.
    """
    record = _finite_or_null(json.loads(json.dumps(result, default=str)))
    record.pop("sha256", None)
    validate(record, str(path))
    record["sha256"] = content_digest(record)
    atomic_write(path, json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return str(record["sha256"])


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


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
    if not 0 <= result["seed"] < 2**32:
        raise MtbenchError(f"{name}: seed {result['seed']} is not in [0, 2**32)")
    if "sha256" in result and not isinstance(result["sha256"], str):
        raise MtbenchError(f"{name}: field 'sha256' is not a string")
    _check_depth(result, name)
    _validate_values(result, name)
    return result


def _check_depth(value: Any, name: str) -> None:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MtbenchError(f"{name}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _validate_values(result: dict[str, Any], name: str) -> None:
    for section in ("metrics", "params", "perf"):
        for key, value in result[section].items():
            if _is_number(value) and not (math.isfinite(value) and abs(value) <= LIMIT):
                raise MtbenchError(f"{name}: {section} '{key}' = {_short(value)} is not a finite number within "
                                   f"±{LIMIT:g}")
    for key, value in result["metrics"].items():
        if not (_is_number(value) or value is None):
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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} characters)"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_short(text)} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``result.json``.

    Raises:
        MtbenchError: naming the file: unreadable, too large, not JSON (also ``NaN``/``Infinity``, ``1e999``, a
            400-digit integer, nesting 200,000 deep), not the schema, an absurd value, or content that does not match
            its ``sha256`` (edited after it was written).
    """
    try:
        if Path(path).stat().st_size > MAX_BYTES:
            raise MtbenchError(f"{path}: result file larger than {MAX_BYTES // 2**20} MiB")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MtbenchError(f"{path}: unreadable result file ({exc.__class__.__name__})") from exc
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise MtbenchError(f"{path}: unreadable result file ({exc.__class__.__name__}: {exc.msg} at line "
                           f"{exc.lineno})") from exc
    except ValueError as exc:
        raise MtbenchError(f"{path}: unreadable result file ({exc})") from exc
    except RecursionError as exc:
        raise MtbenchError(f"{path}: unreadable result file (nested too deeply)") from exc
    validate(data, str(path))
    if "sha256" in data and content_digest(data) != data["sha256"]:
        raise MtbenchError(f"{path}: content does not match its sha256 (the file was edited after it was written)")
    return data


def verified(result: dict[str, Any]) -> bool:
    """Whether a record read by :func:`read_result` carried a digest (which then matched its content)."""
    return isinstance(result.get("sha256"), str)
