"""The multi-task score Δm and single-task baseline files (metrics.md §4.1, methods.md §8).

``Δm = (100 / T) · Σ_t (−1)^{l_t} · (M_t − M_{t,STL}) / M_{t,STL}`` with ``l_t = 1`` when lower is better for task
``t``'s headline metric: the mean relative gain, in percent, of a multi-task model over single-task references
trained with the same backbone and schedule. Positive means better on average. One headline metric per task (the
task's primary metric), averaged flat over tasks; with one metric per task this equals LibMTL's two-level Δp.

A baseline file is JSON holding ``{"metrics": {subtask: {metric: value}}}`` in the units the task's metrics produce,
the ``protocol`` the values were measured under (``{"task": name, "task_version": v, "config": {key: value}}``: the
task, its version and the task settings that define data, model and augmentation) and provenance (``id``,
``version``, ``units``, ``source``); shipped files live in ``mtbench/baselines/``. Δm is only computed against a file
whose protocol matches the run's (:func:`protocol_mismatch`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .errors import DataError
from .interfaces import MetricSpec


BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
"""Folder of the baseline files shipped with mtbench."""


def delta_m(
    scores: Mapping[str, float],
    baselines: Mapping[str, float],
    lower_is_better: Mapping[str, bool] | Collection[str],
) -> tuple[float, dict[str, float]]:
    """Δm in percent and each task's signed relative delta in percent (positive = better than its baseline).

    Args:
        scores: task -> the multi-task model's headline metric.
        baselines: task -> the single-task reference of the same metric, in the same units.
        lower_is_better: task -> whether lower is better, or the collection of the tasks where it is.

    Returns:
        ``(Δm, {task: (−1)^{l_t} · 100 · (M_t − M_t,STL) / M_t,STL})`` over the tasks of ``scores``.

    Raises:
        ValueError: no task, a task without a baseline, or a zero baseline.
    """
    if not scores:
        raise ValueError("delta_m needs at least one task score")
    deltas = {}
    for task, score in scores.items():
        if task not in baselines:
            raise ValueError(f"delta_m: no baseline for task '{task}' (baselines: {', '.join(baselines) or 'none'})")
        base = float(baselines[task])
        if base == 0 or not math.isfinite(base):
            raise ValueError(f"delta_m: the baseline of task '{task}' must be finite and non-zero, got {base}")
        lower = lower_is_better.get(task, False) if isinstance(lower_is_better, Mapping) else task in lower_is_better
        sign = -1.0 if lower else 1.0
        deltas[task] = sign * 100.0 * (float(score) - base) / base
    return sum(deltas.values()) / len(deltas), deltas


def delta_m_metrics(
    values: Mapping[str, float],
    specs: Mapping[str, Mapping[str, MetricSpec]],
    baselines: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """``val/delta_m`` and ``val/<subtask>/delta`` from validation values ``val/<subtask>/<metric>``.

    Each subtask's primary metric is compared with its baseline; subtasks with no value or no baseline for it are
    left out (Δm is then over the rest), and nothing is returned when none is left.
    """
    scores, refs, lower = {}, {}, {}
    for sub, group in specs.items():
        for name, spec in group.items():
            key = f"val/{sub}/{name}"
            if spec.primary and key in values and name in baselines.get(sub, {}):
                scores[sub], refs[sub], lower[sub] = values[key], baselines[sub][name], not spec.higher_is_better
    if not scores:
        return {}
    dm, deltas = delta_m(scores, refs, lower)
    return {"val/delta_m": dm, **{f"val/{sub}/delta": d for sub, d in deltas.items()}}


def load_baselines(path: str | Path) -> dict[str, dict[str, float]]:
    """The ``metrics`` of a baseline file: ``{subtask: {metric: value}}``.

    Raises:
        DataError: the file is missing, not JSON, or its ``metrics`` is not a mapping of mappings of numbers.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable baseline file ({exc.__class__.__name__})") from exc
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict) or not metrics:
        raise DataError(f"{path}: a baseline file needs \"metrics\": {{subtask: {{metric: value}}}}")
    out: dict[str, dict[str, float]] = {}
    for sub, group in metrics.items():
        if not isinstance(group, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in group.values()
        ):
            raise DataError(f"{path}: metrics.{sub} must map metric names to numbers")
        out[sub] = {name: float(v) for name, v in group.items()}
    return out


def baseline_protocol(path: str | Path) -> dict[str, Any]:
    """The ``protocol`` of a baseline file: ``{"task": str, "task_version": str, "config": {key: value}}``.

    Raises:
        DataError: the file is unreadable or has no such ``protocol`` (the message shows the expected shape).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable baseline file ({exc.__class__.__name__})") from exc
    protocol = data.get("protocol") if isinstance(data, dict) else None
    if (not isinstance(protocol, dict) or not isinstance(protocol.get("task"), str)
            or not isinstance(protocol.get("task_version"), str) or not isinstance(protocol.get("config"), dict)):
        raise DataError(f"{path}: a baseline file needs \"protocol\": {{\"task\": name, \"task_version\": version, "
                        f"\"config\": {{task setting: value}}}} naming what its values were measured under")
    return protocol


def protocol_mismatch(protocol: Mapping[str, Any], task: str, version: str, config: Mapping[str, Any]) -> str | None:
    """What differs between a baseline's protocol and a run's task, task version and task config (``None``: all
    match). Every key of ``protocol["config"]`` must equal the run's value; lists and tuples compare as lists."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    if protocol["task"] != task:
        return f"task: baseline {protocol['task']!r}, run {task!r}"
    if str(protocol["task_version"]) != str(version):
        return f"task version: baseline {protocol['task_version']!r}, run {version!r}"
    for key, value in protocol["config"].items():
        if key not in config:
            return f"task.{key}: baseline {value!r}, not a setting of the run's task"
        if plain(config[key]) != plain(value):
            return f"task.{key}: baseline {value!r}, run {plain(config[key])!r}"
    return None
